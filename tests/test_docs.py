"""The README's and the documentation's links and the files and commands they name exist."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "PYPI.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _links(page: pathlib.Path):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            yield target.split("#")[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file(page):
    missing = [target for target in _links(page) if not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_the_readme_names_only_scripts_that_exist():
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\b((?:examples|bench)/\w+\.py)\b", text))
    assert named, "the README names no example or benchmark"
    assert not [path for path in named if not (ROOT / path).exists()]


def test_the_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    commands = [line.strip() for line in head if line.startswith("    pip install")]
    assert commands == ['pip install -e . && python -m autobatch demo',
                        'pip install -e ".[test]" && python -m pytest -q -m "not slow"']


def _list_without_blank_line_before(text: str) -> list[int]:
    """Lines where a list starts right under a paragraph: Markdown then runs the list into the paragraph."""
    lines, found, fence = text.split("\n"), [], False
    item = re.compile(r"^\s*([-*]|\d+\.)\s")
    for number, line in enumerate(lines[1:], start=2):
        if line.startswith("```"):
            fence = not fence
        previous = lines[number - 2]
        if not fence and item.match(line) and previous.strip() and not item.match(previous) \
                and not previous.startswith((" ", "|", "#")):
            found.append(number)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_list_has_a_blank_line_before_it(page):
    assert _list_without_blank_line_before(page.read_text()) == [], page
    assert _list_without_blank_line_before("A paragraph:\n- an item") == [2]  # the check can fail


def _python_blocks(page: pathlib.Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))


def test_the_getting_started_page_runs_to_the_end(tmp_path):
    """Its code blocks, in order, as a user pastes them: a fresh process, no cache, in a folder of its own."""
    import os
    import subprocess
    import sys

    script = tmp_path / "getting_started.py"
    script.write_text(_python_blocks(ROOT / "docs" / "getting-started.md"))
    environment = {**os.environ, "AUTOBATCH_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 3: mean loss" in result.stdout and "splits          [16, 16]" in result.stdout
    assert "training accuracy" in result.stdout


#: Characters of a code line the documentation site shows without scrolling, at a 1300-pixel window.
CODE_WIDTH = 84


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_fit_the_page(page):
    fence, wide = False, []
    for number, line in enumerate(page.read_text().split("\n"), start=1):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif fence and len(line) > CODE_WIDTH:
            wide.append(number)
    assert wide == [], f"{page.relative_to(ROOT)}: code lines over {CODE_WIDTH} characters at {wide}"


def test_the_module_map_names_every_module():
    text = (ROOT / "docs" / "development.md").read_text()
    package = ROOT / "autobatch"
    missing = [str(path.relative_to(package)) for path in package.rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py") and path.parent.name not in ("demo", "integrations")
               and f"`{path.relative_to(package)}`" not in text]
    assert missing == []


def test_the_package_and_the_site_name_the_same_addresses():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    urls = dict(line.split(" = ") for line in config["metadata"]["project_urls"].strip().splitlines())
    site = (ROOT / "mkdocs.yml").read_text()
    assert f"site_url: {urls['Documentation']}" in site and f"repo_url: {urls['Source']}" in site
    assert urls["Changelog"] == urls["Documentation"] + "changelog/" and urls["Issues"] == urls["Source"] + "/issues"
    assert config["metadata"]["url"] == urls["Source"]


def test_the_package_page_opens_with_the_install_a_user_outside_a_checkout_runs():
    page = (ROOT / "PYPI.md").read_text()
    first_command = next(line for line in page.splitlines() if line.startswith("pip "))
    assert first_command.split("#")[0].strip() == "pip install torch-autobatch"
    assert "pip install torch-autobatch" in (ROOT / "README.md").read_text()
    assert all(target.startswith("https://") for target in re.findall(r"\]\(([^)\s]+)\)", page))


def _documented():
    """The objects docs/reference.md renders, with their public members."""
    import importlib
    import inspect

    for name in re.findall(r"^::: ([\w.]+)$", (ROOT / "docs" / "reference.md").read_text(), re.M):
        module_name, _, attribute = name.rpartition(".")
        try:
            target = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            target = importlib.import_module(name)
        yield name, target
        if inspect.ismodule(target):
            yield from ((f"{name}.{member}", getattr(target, member)) for member in target.__all__)
        elif inspect.isclass(target):
            # A class's own methods and properties; hooks it overrides (Lightning's, say) keep the host's docs.
            for member, value in vars(target).items():
                own = inspect.isfunction(value) or isinstance(value, property)
                inherited = any(hasattr(base, member) for base in target.__mro__[1:])
                if own and not member.startswith("_") and not inherited:
                    yield f"{name}.{member}", value


def test_the_reference_renders_no_sphinx_markup_and_every_object_says_what_it_is():
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    seen, problems = set(), []
    for name, target in _documented():
        text = target.__doc__ or ""
        if not text.strip():
            problems.append(f"{name}: no docstring")
        if re.search(r":(func|meth|class|attr|mod):`|::\s*$", text, re.M):
            problems.append(f"{name}: Sphinx markup (a role or '::'), which mkdocstrings shows raw")
        if name in seen:
            problems.append(f"{name}: documented twice")
        seen.add(name)
    assert len(seen) > 20 and problems == []

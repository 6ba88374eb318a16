"""The README's and the documentation's links and the files and commands they name exist."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


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

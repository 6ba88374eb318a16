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

"""The documentation cannot rot: every relative link points to a file, every command README quotes is one the CLI
accepts, every path it names exists, and README stays a front door (the rest is in docs/)."""

import argparse
import re

import pytest
from conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 260

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target); the text may span lines
# `alignkit COMMAND`, `alignkit --verbose COMMAND` and `python3 -m alignkit COMMAND`, not `alignkit: error:` or a path
INVOCATION = re.compile(r"(?:^|[\s;&|(])alignkit(?:\s+--verbose)*\s+([a-z][\w-]*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def _code_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def _commands(block: str) -> list[str]:
    """Each `alignkit ...` invocation of a code block, with its continuation lines (indented, or after a backslash)
    joined to it and comments dropped."""
    commands, current = [], None
    for line in block.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if INVOCATION.search(line):
            current = line.rstrip("\\")
            commands.append(current)
        elif current is not None and line[:1].isspace() and line.strip():
            commands[-1] = current = current + " " + line.strip().rstrip("\\")
        else:
            current = None
    return commands


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from alignkit.cli import _parser

    (action,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _quoted_commands() -> list[tuple[str, str]]:
    """(subcommand, the rest of the command line) for every alignkit invocation in README's code blocks."""
    found = []
    for block in _code_blocks(README.read_text()):
        for command in _commands(block):
            match = INVOCATION.search(command)
            found.append((match.group(1), command[match.end() :]))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_every_relative_link_points_to_a_file(page):
    text = FENCE.sub("", page.read_text())  # a link in a code block is not a link
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z+.-]*:", target) or target.startswith("#"):  # https:, mailto:, a link within the page
            continue
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to files that do not exist: {broken}"


def test_docs_readme_commands_name_real_subcommands_and_options():
    subcommands = _subcommands()
    quoted = _quoted_commands()
    assert len(quoted) >= len(subcommands), quoted  # the commands block was found and read
    wrong = []
    for name, rest in quoted:
        if name not in subcommands:
            wrong.append(f"alignkit {name}: no such subcommand (there are {sorted(subcommands)})")
            continue
        accepted = subcommands[name]._option_string_actions
        wrong += [
            f"alignkit {name} {option}: no such option" for option in OPTION.findall(rest) if option not in accepted
        ]
    assert not wrong, "\n".join(wrong)


def test_docs_readme_lists_every_subcommand():
    missing = set(_subcommands()) - {name for name, _ in _quoted_commands()}
    assert not missing, f"README's commands block does not show: {sorted(missing)}"


def test_docs_paths_readme_names_exist():
    text = README.read_text()
    paths = set(re.findall(r"\bpython3? (benchmarks/[\w./-]+\.py)", text))
    for pattern in (r"recipes/[\w./*-]+\.yaml", r"data/[\w./-]+", r"docs/[\w./-]+"):
        paths |= {p.rstrip(".,;:") for p in re.findall(rf"(?<![\w/.-]){pattern}", text)}
    # a recipe named my*.yaml is the reader's own (README's round with people writes recipes/my-rounds.yaml)
    paths = {p for p in paths if not (p.startswith("recipes/") and p.split("/")[-1].startswith("my"))}
    assert any(p.startswith("benchmarks/") for p in paths) and any(p.startswith("recipes/") for p in paths), paths
    missing = sorted(p for p in paths if not (list(REPO.glob(p)) if "*" in p else (REPO / p).exists()))
    assert not missing, f"README names paths that do not exist: {missing}"


def test_docs_readme_is_a_front_door():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move a topic to docs/"
    )

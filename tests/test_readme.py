"""The README is the user's manual: it must name every option of every command, in that
command's own section, stay short enough to read, start with the two commands the
Makefile and CI provide, and link only to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from compressor.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 350
HELP = {"--help", "-h"}


def _commands(command: click.Command, path: tuple[str, ...] = ()):
    """(path, command) for the group itself and every command and subcommand under it."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(cli))


def _option_strings(command: click.Command) -> list[str]:
    """The primary long form of every option (`--onnx` of `--onnx/--no-onnx`), help left out."""
    found = []
    for param in command.params:
        if isinstance(param, click.Option):
            found += [o for o in param.opts if o.startswith("--") and o not in HELP]
    return found


def _section(text: str, path: tuple[str, ...]) -> str:
    """The text from the heading "## `tapc <path> ...`" to the next heading of the same or a
    higher level; the whole README for the `tapc` group itself."""
    if not path:
        return text
    lines = text.splitlines()
    heading = re.compile(r"^(#+)\s+`tapc " + re.escape(" ".join(path)) + r"(?:[ `])")
    for i, line in enumerate(lines):
        match = heading.match(line)
        if match:
            level = len(match.group(1))
            end = next((j for j in range(i + 1, len(lines))
                        if re.match(r"^#{1,%d}\s" % level, lines[j])), len(lines))
            return "\n".join(lines[i:end])
    pytest.fail(f"README.md has no heading like \"## `tapc {' '.join(path)} ...`\" for that command")


def _mentions(text: str, option: str) -> bool:
    """`option` as a whole word: `--max-ppl` is not found inside `--max-ppl-increase`."""
    return re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", text) is not None


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(("tapc", *p)) for p, _ in COMMANDS])
def test_every_option_is_in_its_commands_section(path, command):
    section = _section(README.read_text(encoding="utf-8"), path)
    missing = [o for o in _option_strings(command) if not _mentions(section, o)]
    where = f"the section of `tapc {' '.join(path)}`" if path else "README.md"
    assert not missing, f"{where} does not mention {', '.join(missing)}"


def test_the_walk_finds_the_commands():
    """A guard for the test above: the walk reaches the commands users run."""
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"compress", "compare", "export", "generate", "eval", "report"} <= names


def test_readme_is_short_enough_to_read():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it at most {MAX_LINES} (results go to benchmarks/RESULTS.md)"


def _first_commands(text: str, count: int = 2) -> list[str]:
    """The first `count` lines of the README's first indented code block, comments removed."""
    commands = []
    for line in text.splitlines():
        if line.startswith("    ") and line.strip():
            commands.append(line.split("#", 1)[0].strip())
            if len(commands) == count:
                break
        elif commands:
            break
    return commands


def test_first_commands_are_the_makefiles_and_ci_runs_the_second():
    demo, test = _first_commands(README.read_text(encoding="utf-8"))
    assert re.search(r"(^|\s)make demo$", demo), demo
    assert test == "make test", test
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"the Makefile has no `{target}` target"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test\s*$", ci, re.MULTILINE), ".ci/run does not run `make test`"


def test_readme_links_point_to_files_in_the_repository():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    assert targets, "README.md links to nothing in the repository"
    missing = [t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"

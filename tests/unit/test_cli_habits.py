"""CLI habits in-process: every command's help has an example and its environment; the docs name
only commands that exist. (The CLI as a process: tests/e2e/test_cli_habits.py.)"""

from __future__ import annotations

import pytest

from supervisor.cli import build_parser, completion, main
from tests.support import ROOT


def public_commands() -> dict[str, object]:
    return completion.commands(build_parser())


@pytest.mark.parametrize("name", sorted(public_commands()))
def test_every_command_help_has_an_example_and_its_environment(name: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  qlora-watch " + name in out, f"{name}: add it to cli_help.EXAMPLES"
    assert "environment:\n  " in out


def test_docs_name_only_commands_that_exist() -> None:
    import re

    names = set(public_commands())
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        code = re.findall(r"(?s)```.*?```", text)  # fenced blocks, then inline code spans
        code += re.findall(r"`([^`\n]+)`", re.sub(r"(?s)```.*?```", "", text))
        for cmd in re.findall(r"\bqlora-watch ([a-z][a-z-]+)", "\n".join(code)):
            assert cmd in names, f"{doc.name} names `qlora-watch {cmd}`, which does not exist"

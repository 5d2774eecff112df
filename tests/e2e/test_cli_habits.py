"""The command line as people expect it: examples and env vars in --help, no hidden commands in
errors, static shell completion, and docs that name only commands that exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from supervisor.cli import build_parser, completion
from tests.support import ROOT, qlw


def public_commands() -> dict[str, object]:
    return completion.commands(build_parser())


def test_unknown_command_lists_only_public_commands() -> None:
    res = qlw("sart")
    assert res.returncode == 2
    assert "did you mean start?" in res.stderr and "_supervise" not in res.stderr
    assert "_socket" not in res.stderr and "_tui" not in res.stderr
    assert "Traceback" not in res.stderr


def test_completion_scripts_are_static_and_complete(tmp_path: Path) -> None:
    # Generating them imports neither torch nor textual; using them runs no Python at all.
    code = ("import sys; from supervisor.cli import main; main(['completion', 'bash']); "
            "print(sorted({'torch', 'textual', 'transformers'} & set(sys.modules)), file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stderr.strip() == "[]"
    script = tmp_path / "qlw.bash"
    script.write_text(res.stdout)
    runs = tmp_path / "home" / "runs"
    (runs / "amber-falcon").mkdir(parents=True)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        bash = (f"source {script}; COMP_WORDS=(qlora-watch {line}); COMP_CWORD={len(words)}; "
                "_qlora_watch; printf '%s\\n' \"${COMPREPLY[@]}\"")
        out = subprocess.run(["bash", "--norc", "-c", bash], capture_output=True, text=True, cwd=tmp_path,
                             env={"PATH": "/usr/bin:/bin", "QLORA_WATCH_HOME": str(tmp_path / "home")},
                             check=True).stdout  # PATH has no python: nothing but bash answers
        return out.split()

    assert complete("st") == ["start", "status", "stop"]
    assert complete("attach", "am") == ["amber-falcon"]
    assert "--auto-fit" in complete("start", "--a")
    assert "tiny" in complete("start", "t")
    assert complete("recipes", "c") == ["cp"]
    assert complete("completion", "f") == ["fish"]
    for shell in ("zsh", "fish"):
        text = completion.script(shell, build_parser(), ["tiny"])
        assert "attach" in text and "_supervise" not in text



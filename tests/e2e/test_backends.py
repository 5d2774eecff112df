"""model.backend with real processes: the tiny recipe trained under "auto" never imports Unsloth;
`start` refuses "unsloth" where it is not installed. (The choice itself: tests/unit/test_backends.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, fake_unsloth

TINY = ROOT / "recipes" / "tiny.toml"


@pytest.mark.slow
def test_tiny_run_under_auto_trains_on_hf_with_the_notice_and_never_imports_unsloth(tmp_path: Path) -> None:
    site = fake_unsloth(tmp_path, "raise AssertionError('the HF path imported unsloth')\n")
    events = tmp_path / "events.jsonl"
    code = (
        "import sys, runpy\n"
        "sys.argv = ['train', '--recipe', %r, '--set', 'model.backend=auto', '--set', 'train.max_steps=1',"
        " '--output-dir', %r, '--events', %r]\n"
        "try:\n"
        "    runpy.run_module('supervisor.runner.train', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'unsloth' not in sys.modules\n"
        "print('unsloth-not-imported')\n"
    ) % (str(TINY), str(tmp_path / "out"), str(events))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "QLW_TINY_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "unsloth-not-imported" in res.stdout
    notices = [json.loads(x)["message"] for x in events.read_text().splitlines() if '"notice"' in x]
    assert 'backend hf: model.backend = "auto": HF path, because the tiny test model trains on the HF path' in notices
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_start_refuses_unsloth_where_it_is_not_installed(tmp_path: Path) -> None:
    if any((Path(p) / "unsloth").exists() for p in sys.path if p):
        pytest.skip("unsloth is installed in this environment")
    env = {**os.environ, "QLORA_WATCH_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "supervisor", "start", str(ROOT / "recipes" / "8b.toml"),
                          "--set", "model.backend=unsloth", "--set", f"data.path={ROOT / 'recipes/data/tiny-chat.jsonl'}",
                          "--detach"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().endswith('model.backend = "unsloth" but Unsloth is not installed here '
                                       "(pip install 'qlora-watch[unsloth]', or set model.backend = \"auto\" or \"hf\")")
    assert "Traceback" not in res.stderr and not (tmp_path / "home" / "runs").exists()

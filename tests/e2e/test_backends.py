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


FAILING_LOADER = '''__version__ = "2026.10.9-test"
class FastLanguageModel:
    @staticmethod
    def from_pretrained(**kwargs):
        import os, torch
        if os.environ.get("FAKE_UNSLOTH_OOM"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("Unsloth: this model variant is not supported yet\\nsecond line")
'''


def test_auto_falls_back_to_hf_when_unsloth_fails_to_load_the_model(tmp_path: Path) -> None:
    """Unsloth imported fine but FastLanguageModel.from_pretrained raised: under "auto" the HF path
    loads the model (the real tiny NF4 model, on CPU) and the reason says why; an explicit
    "unsloth" and a CUDA OOM propagate."""
    site = fake_unsloth(tmp_path, FAILING_LOADER)
    code = (
        "import json, os, sys\n"
        "from supervisor.recipe import load_recipe\n"
        "from supervisor.runner.backends import Backend, load_with_fallback\n"
        "from supervisor.runner.tiny import build_tiny\n"
        "import unsloth\n"
        f"r = load_recipe({str(TINY)!r}, ['model.backend=auto'])\n"
        f"folder, _ = build_tiny(r.model.tiny, r.data.path, {str(tmp_path / 'cache')!r}, r.data.format)\n"
        "out = {}\n"
        "b, model, tok = load_with_fallback(Backend('unsloth', 'test'), r, str(folder), 'sdpa')\n"
        "out['auto'] = [b.name, b.reason, type(model).__name__]\n"
        "for label, sets, oom in [('explicit', ['model.backend=unsloth'], ''), ('oom', ['model.backend=auto'], '1')]:\n"
        "    os.environ['FAKE_UNSLOTH_OOM'] = oom\n"
        f"    r2 = load_recipe({str(TINY)!r}, sets)\n"
        "    try:\n"
        "        load_with_fallback(Backend('unsloth', 'test'), r2, str(folder), 'sdpa')\n"
        "        out[label] = 'loaded'\n"
        "    except Exception as e:\n"
        "        out[label] = type(e).__name__\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["auto"] == ["hf", 'model.backend = "auto": HF path, because Unsloth failed to load the '
                           "model: RuntimeError: Unsloth: this model variant is not supported yet",
                           "LlamaForCausalLM"]
    assert out["explicit"] == "RuntimeError" and out["oom"] == "OutOfMemoryError"

"""Issue #14, "robust on real machines", in-process: the SIGTERM mode, secret shapes masked and
metrics kept, the per-uid socket folder, the systemd scope, sizes in words, CUDA_VISIBLE_DEVICES
to NVML, hub cache paths. (With real processes: tests/e2e/test_reliability_machines.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import HF

pytestmark = pytest.mark.timeout(120)


def test_r4_sigterm_mode() -> None:
    from supervisor.daemon.preempt import sigterm_preempts

    assert not sigterm_preempts({}, pid=4242)  # a workstation: SIGTERM detaches (A12)
    assert sigterm_preempts({"SLURM_JOB_ID": "77"}, pid=4242)
    assert sigterm_preempts({}, pid=1)  # a container's pid 1: `docker stop`
    assert sigterm_preempts({"QLW_ON_SIGTERM": "preempt"}, pid=4242)
    assert not sigterm_preempts({"QLW_ON_SIGTERM": "detach", "SLURM_JOB_ID": "77"}, pid=1)


_GHP = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
_PAT = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV"
_S = "s3cr3t-Value-4711"  # a value with no shape: only its name marks it

SECRETS = [  # (line, the secret that must not survive)
    (f"HF_TOKEN={HF}", HF),
    (f"loading with token {HF}", HF),
    (f"git clone https://x:{_GHP}@github.com/o/r", _GHP),
    (f"GH_TOKEN={_GHP}", _GHP),
    (f"using {_PAT} for the push", _PAT),
    ("discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js", "JHMHI8qBe7bk2ZwO5U711o3dV_js"),
    ("notify: slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ", "TIiajkdnlazkcOXrIdevi7FQ"),
    ("ntfys://alice:hunter2pass@ntfy.example.com/topic", "hunter2pass"),
    ("tgram://123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/4242", "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"),
    ("mailtos://user:mailpass99@smtp.example.com", "mailpass99"),
    ("postgres://trainer:db-pass-77@10.0.0.5:5432/runs", "db-pass-77"),
    ("https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX", "XXXXXXXXXXXXXXXXXXXXXXXX"),
    ("https://discord.com/api/webhooks/1234567/abcDEF_ghiJKL-mno", "abcDEF_ghiJKL-mno"),
    ("OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz012345", "sk-proj-abcdefghij"),
    ("key sk-ant-api03-abcdefghijklmnopqrstuvwx in use", "sk-ant-api03-abcdefghij"),
    ("SLACK_BOT=xoxb-123456789012-abcdefghijkl", "xoxb-123456789012"),
    ("google AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "AIzaSyA1b2C3d4E5f6G7h8"),
    ("AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
    ("Authorization: Bearer abcdefgh12345678", "abcdefgh12345678"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "dozjgNryP4J3jVmNHl0w5N"),
    ("wandb: Appending key for api.wandb.ai: 0123456789abcdef0123456789abcdef01234567",
     "0123456789abcdef0123456789abcdef01234567"),
    (f"python train.py --hub_token {_S} --push_to_hub", _S),
    (f"python train.py --hub-token={_S}", _S),
    (f"{{'hub_token': '{_S}', 'loss': 1.2}}", _S),
    (f'{{"api_key": "{_S}"}}', _S),
    (f"['--hub_token', '{_S}']", _S),
    (f"DB_PASSWORD: {_S}", _S),
    (f"MY_SECRET_THING={_S}", _S),
    (f"password=1234 and {_S}", "1234"),
    (f"accessToken: {_S}", _S),
    (f"GET /models?access_token={_S}&x=1", _S),
    ("npm_abcdefghijklmnopqrstuvwxyz0123456789 published", "npm_abcdefghijklmnop"),
    ("glpat-abcdefghijklmnopqrst12 for gitlab", "glpat-abcdefghijklmnopqrst12"),
]


KEPT = [  # metrics, arguments and words that contain "token" or "key": unchanged
    "{'loss': '1.2345', 'grad_norm': '0.5', 'learning_rate': '0.0001', 'num_tokens': '40960.0'}",
    "{'mean_token_accuracy': '0.6123', 'epoch': '0.5'}",
    "{'train_runtime': '12.5', 'train_tokens_per_second': '3800.1', 'train_loss': '1.1'}",
    "generate(max_new_tokens=128, do_sample=False)",
    "python train.py --tokenizer_name ./tok --max_new_tokens 128",
    "{'num_input_tokens_seen': 1048576}",
    "pad_token: <|pad|> eos_token=</s> bos_token_id: 1 pad_token_id=0",
    "tokens/s 3800 max_tokens 2048 tokenizer: ./tok",
    "token: 42 key: loss",
    "dataset_text_key: text, sort_key=length, metric_for_best_model=eval_loss",
    "checkpoint-500 saved (12.3 MB) to https://huggingface.co/org/model",
    "HF_TOKEN_PATH=/home/u/.cache/huggingface/token",
    "the tokenizer adds 3 special tokens; keys: ['input_ids', 'attention_mask']",
    "https://example.com:8080/path?page=2",
]


@pytest.mark.parametrize("line, secret", SECRETS)
def test_r6_secret_shapes_are_masked(line: str, secret: str) -> None:
    from supervisor.redact import redact

    out = redact(line)
    assert secret not in out and "***" in out, out


@pytest.mark.parametrize("line", KEPT)
def test_r6_metrics_and_arguments_are_kept(line: str) -> None:
    from supervisor.redact import redact

    assert redact(line) == line


def test_r6_lists_are_long_enough_and_argv() -> None:
    from supervisor.redact import redact_argv

    assert len(SECRETS) >= 20 and len(KEPT) >= 10
    argv = ["python", "t.py", "--tokenizer_name", "./tok", "--max_new_tokens", "128",
            "--hub_token", _S, "--api-key", _S, "--num_tokens", "7", f"WANDB_API_KEY={_S}"]
    assert redact_argv(argv) == ["python", "t.py", "--tokenizer_name", "./tok", "--max_new_tokens",
                                 "128", "--hub_token", "***", "--api-key", "***", "--num_tokens", "7",
                                 "WANDB_API_KEY=***"]


def test_r1_socket_dir_is_per_uid_in_tmp_not_the_runtime_dir(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    from supervisor import paths

    monkeypatch.delenv("QLORA_WATCH_HOME", raising=False)
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert paths.socket_path("abc") == Path(f"/tmp/qlora-watch-{os.geteuid()}/abc.sock")


def test_r1_scope_when_systemd_run_is_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.control import logind

    state = logind.Logind(in_use=True, kill_user_processes=True, linger=False, user="u")
    fake = tmp_path / "bin" / "systemd-run"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    (tmp_path / "rt" / "systemd").mkdir(parents=True)
    (tmp_path / "rt" / "systemd" / "private").write_text("")
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    argv, scoped = logind.scope_argv(["python", "-m", "supervisor"], state)
    assert scoped and argv[:5] == [str(fake), "--user", "--scope", "--quiet", "--collect"]
    assert "systemd-run --user --scope" in state.note(scoped=True)
    monkeypatch.setenv("QLW_NO_SCOPE", "1")
    assert logind.scope_argv(["x"], state) == (["x"], False)


def test_r8_sizes_in_units_that_fit() -> None:
    from supervisor.guards.base import gib
    from supervisor.units import size

    assert [size(x) for x in (0, 512, 400 * 1024, 2**30 * 3.1, 2**40 * 5)] == [
        "0 B", "512 B", "400.0 KB", "3.1 GB", "5.0 TB"]
    assert gib(0) == "0 B" and gib(420_000) == "410.2 KB"  # not "0.0 GB free, needs ~0.0 GB"


def test_r2_cuda_visible_devices_to_nvml() -> None:
    from supervisor.telemetry.visible import Device, resolve

    devs = [Device(0, "GPU-8f2a1111-aaaa-bbbb-cccc-000000000000"),
            Device(1, "GPU-77c02222-aaaa-bbbb-cccc-000000000001",
                   ("MIG-3b1e0000-0000-0000-0000-00000000000a",)),
            Device(2, "GPU-8f2a3333-aaaa-bbbb-cccc-000000000002")]
    assert resolve(None, devs) is None  # unset: all
    assert resolve("", devs) == set()
    assert resolve("1", devs) == {1}
    assert resolve("2,0", devs) == {0, 2}
    assert resolve("GPU-77c0", devs) == {1}  # a unique prefix
    assert resolve("77c02222", devs) == {1}  # GPU- optional
    assert resolve("GPU-8f2a", devs) == set()  # ambiguous: nothing, like CUDA
    assert resolve("MIG-3b1e0000-0000-0000-0000-00000000000a", devs) == {1}
    assert resolve("MIG-GPU-8f2a3333-aaaa-bbbb-cccc-000000000002/1/0", devs) == {2}
    assert resolve("0,7,2", devs) == {0}  # CUDA stops at the first bad entry
    assert resolve("-1", devs) == set()
    assert resolve("1,1", devs) == {1}


def test_r3_hub_cache_paths() -> None:
    from supervisor.download import describe, hub_cache, repo_folder

    assert hub_cache({"HF_HUB_CACHE": "/c"}) == Path("/c")
    assert hub_cache({"HF_HOME": "/h"}) == Path("/h/hub")
    assert hub_cache({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert repo_folder("meta-llama/Llama-3.1-8B") == "models--meta-llama--Llama-3.1-8B"
    assert repo_folder("./local/model") is None and repo_folder(None) is None
    assert describe({"active": True, "bytes": 3 * 2**30, "total": 16 * 2**30, "rate_bps": 45 * 2**20,
                     "eta_s": 296}) == "downloading the model: 3.0 GB of 16.0 GB at 45.0 MB/s, ETA 4m56s"


def test_r2_preflight_sizes_the_runs_first_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """preflight's card is CUDA's device 0 (the first of CUDA_VISIBLE_DEVICES), not NVML's."""
    from supervisor.preflight.machine import detect_gpu
    from tests.fakes.nvml import FakeDevice, FakeNVML

    def lib() -> FakeNVML:
        return FakeNVML([FakeDevice(uuid="GPU-aaaa-0", mem_total_mib=24_000.0, name="RTX 4090"),
                         FakeDevice(uuid="GPU-bbbb-1", mem_total_mib=143_771.0)])

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    total, why = detect_gpu(lib())
    assert total == 24_000.0 * 2**20 and why == "NVML: RTX 4090, device 0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    total, why = detect_gpu(lib())
    assert total == 143_771.0 * 2**20 and why == "NVML: NVIDIA H200, device 1 (CUDA_VISIBLE_DEVICES=1)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    assert detect_gpu(lib())[1].startswith("NVML: NVIDIA H200, device 1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpu(lib()) == (None, "no GPU visible (CUDA_VISIBLE_DEVICES='' names none of the 2 NVML sees)")

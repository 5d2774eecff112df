"""`qlora-watch doctor`: what breaks QLoRA boxes, checked in one go, each with its fix.

Stdlib only at import: it must run even where another package's files have replaced ours (the
PyPI `supervisor`, supervisord, installs the same import name). The training stack is probed in
a child process, so a bitsandbytes that crashes on load cannot take the doctor down with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from supervisor.extras import install_hint  # stdlib-only too

OK, WARN, FAIL = "ok", "warn", "fail"
GIB = 1024**3
HF_CACHE_WARN_GIB = 40.0  # an 8B base in bf16 is 16 GB; a 70B one 140 GB
RUNS_WARN_GIB, RUNS_FAIL_GIB = 10.0, 1.0
SEPARATE_VENV = ("python3 -m venv ~/.venvs/qlora-watch && ~/.venvs/qlora-watch/bin/pip install "
                 "<qlora-watch's checkout or wheel>, then run ~/.venvs/qlora-watch/bin/qlora-watch")

# Runs in a child: what the training stack says about itself, as one JSON line.
PROBE = r"""
import importlib.util as u, json, sys
out = {}
def ver(m):
    try:
        import importlib.metadata as md
        return md.version(m)
    except Exception:
        return None
if u.find_spec("torch"):
    try:
        import torch
        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "available": torch.cuda.is_available(), "devices": torch.cuda.device_count()}
    except Exception as e:
        out["torch"] = {"error": f"{type(e).__name__}: {e}"}
if u.find_spec("bitsandbytes"):
    try:
        import bitsandbytes
        from bitsandbytes.cextension import lib
        out["bitsandbytes"] = {"version": bitsandbytes.__version__, "lib": type(lib).__name__,
                               "cuda": bool(getattr(lib, "compiled_with_cuda", False))}
    except Exception as e:
        out["bitsandbytes"] = {"error": f"{type(e).__name__}: {e}"}
for name, mod in (("liger-kernel", "liger_kernel"), ("unsloth", "unsloth"), ("flash-attn", "flash_attn")):
    out[name] = ver(name) if u.find_spec(mod) else None
print(json.dumps(out))
"""


@dataclass
class Check:
    """One line of the doctor's answer."""

    name: str
    status: str
    message: str
    fix: str = ""


# ------------------------------------------------------------------------------ the checks


def check_supervisor_package() -> Check:
    """Is the `supervisor` import package ours? supervisord's shares the name."""
    import importlib.metadata as md

    owners = sorted(set(md.packages_distributions().get("supervisor", [])))
    others = [d for d in owners if d.lower().replace("_", "-") != "qlora-watch"]
    try:
        import supervisor

        ours = getattr(supervisor, "__version__", None) is not None
    except Exception:  # noqa: BLE001 - a broken package is the finding, not a crash
        ours = False
    if others or not ours:
        who = f" ({', '.join(others)} installed here)" if others else ""
        return Check("supervisor package", FAIL,
                     f"the `supervisor` import package is not only qlora-watch's{who}: the PyPI "
                     "package `supervisor` (supervisord) installs the same name and breaks both",
                     f"use a separate venv for qlora-watch: {SEPARATE_VENV}")
    return Check("supervisor package", OK, f"qlora-watch's ({Path(supervisor.__file__).parent})")


def _nvml() -> tuple[Any, str | None]:
    try:
        from supervisor.telemetry.nvml import nvml_library

        pynvml = nvml_library()
        pynvml.nvmlInit()
        return pynvml, None
    except Exception as e:  # noqa: BLE001 - no driver, no library, no device
        return None, f"{type(e).__name__}: {e}"


def check_driver(nvml: Any, err: str | None) -> tuple[Check, int | None, int]:
    """(the check, the driver's CUDA version as 12040, GPU count)."""
    if nvml is None:
        return Check("NVIDIA driver / NVML", WARN, f"NVML not available ({err}): no GPU telemetry, "
                     "no NVIDIA GPU training here", "on a GPU box: install the NVIDIA driver "
                     "(nvidia-smi must work); on a CPU box nothing to do"), None, 0
    try:
        drv = nvml.nvmlSystemGetDriverVersion()
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        n = int(nvml.nvmlDeviceGetCount())
    except Exception as e:  # noqa: BLE001
        return Check("NVIDIA driver / NVML", FAIL, f"NVML loaded but failed: {e}",
                     "reboot after a driver update, or reinstall the driver"), None, 0
    drv = drv.decode() if isinstance(drv, bytes) else drv
    return (Check("NVIDIA driver / NVML", OK,
                  f"driver {drv} (CUDA {cuda // 1000}.{cuda % 1000 // 10}), {n} GPU(s)"), cuda, n)


def probe_stack(timeout: float = 180.0) -> dict[str, Any]:
    """What torch, bitsandbytes and the optional kernels say, from a child process."""
    try:
        res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"importing the training stack took over {timeout:.0f} s"}
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        return {"error": f"the training stack crashed on import: {tail}"}
    return json.loads(lines[-1])


def check_torch(stack: dict[str, Any], driver_cuda: int | None, gpus: int) -> Check:
    t = stack.get("torch")
    if "error" in stack:
        return Check("torch", FAIL, stack["error"], "reinstall torch: pip install --force-reinstall torch")
    if t is None:
        return Check("torch", WARN, "not installed: this install can watch runs but not train",
                     install_hint("train") + "; on a GPU box with your CUDA build of torch")
    if "error" in t:
        return Check("torch", FAIL, f"import fails: {t['error']}", "pip install --force-reinstall torch")
    build = t.get("cuda")
    if build is None:
        if gpus:
            return Check("torch", FAIL, f"torch {t['version']} is a CPU build on a box with {gpus} GPU(s)",
                         "install a CUDA build: pip install torch --index-url "
                         "https://download.pytorch.org/whl/cu128 (pick your CUDA)")
        return Check("torch", OK, f"torch {t['version']}, CPU build (no NVIDIA GPU here)")
    major, minor = (int(x) for x in str(build).split(".")[:2])
    if driver_cuda is not None and major * 1000 + minor * 10 > driver_cuda:
        have = f"{driver_cuda // 1000}.{driver_cuda % 1000 // 10}"
        return Check("torch", FAIL, f"torch {t['version']} is built for CUDA {build}, the driver "
                     f"supports up to CUDA {have}", f"upgrade the NVIDIA driver, or install a torch "
                     f"built for CUDA {have} or older")
    if gpus and not t.get("available"):
        return Check("torch", FAIL, f"torch {t['version']} (CUDA {build}) sees no GPU",
                     "check CUDA_VISIBLE_DEVICES and that nvidia-smi works")
    return Check("torch", OK, f"torch {t['version']}, CUDA {build}"
                 + (f", {t.get('devices')} device(s)" if t.get("available") else ", no GPU here"))


def check_bitsandbytes(stack: dict[str, Any], gpus: int) -> Check:
    b = stack.get("bitsandbytes")
    if "error" in stack or b is None:
        return Check("bitsandbytes", WARN, "not installed (NF4 needs it)", install_hint("train"))
    if "error" in b:
        return Check("bitsandbytes", FAIL, f"import fails: {b['error']}",
                     "pip install --force-reinstall bitsandbytes")
    if "Mock" in str(b.get("lib")):
        return Check("bitsandbytes", FAIL, f"bitsandbytes {b['version']}: its native library did "
                     "not load", "python -m bitsandbytes shows why; usually a torch/CUDA mismatch")
    if gpus and not b.get("cuda"):
        return Check("bitsandbytes", FAIL, f"bitsandbytes {b['version']} loaded its CPU library on a "
                     "GPU box", "python -m bitsandbytes; reinstall bitsandbytes for your CUDA")
    kind = "CUDA" if b.get("cuda") else "CPU"
    return Check("bitsandbytes", OK, f"bitsandbytes {b['version']}, {kind} native library loads")


def check_optional(stack: dict[str, Any], gpus: int) -> list[Check]:
    """liger-kernel, Unsloth, flash-attn: each speeds up a GPU run; none is required."""
    fixes = {"liger-kernel": install_hint("gpu"), "unsloth": install_hint("unsloth"),
             "flash-attn": "pip install flash-attn --no-build-isolation"}
    out = []
    for name, fix in fixes.items():
        v = stack.get(name)
        if v:
            out.append(Check(name, OK, f"{name} {v}"))
        elif gpus:
            out.append(Check(name, WARN, "not installed (optional: faster on a GPU)", fix))
        else:
            out.append(Check(name, OK, "not installed (optional; it needs a CUDA GPU)"))
    return out


def hf_token_source(env: dict[str, str] | None = None) -> str | None:
    """Where a Hugging Face token would come from, or None. The token itself is never read out."""
    env = dict(os.environ if env is None else env)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env.get(var):
            return var
    path = env.get("HF_TOKEN_PATH") or str(hf_home(env) / "token")
    try:
        return f"the file {path}" if Path(path).is_file() and Path(path).stat().st_size > 0 else None
    except OSError:
        return None


def hf_home(env: dict[str, str]) -> Path:
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(env.get("HF_HOME") or Path(xdg) / "huggingface").expanduser()


def check_hf_token() -> Check:
    src = hf_token_source()
    if src:
        return Check("HF token", OK, f"present (from {src}; not shown)")
    return Check("HF token", WARN, "none: gated models (Llama 3.1) cannot download",
                 "hf auth login, or export HF_TOKEN (never put it in a recipe)")


def free_gib(path: Path) -> tuple[float, Path]:
    """Free space where `path` is or would be created (its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / GIB, p


def _size(free_gib_: float) -> str:
    """GiB in a unit that fits: a nearly full disk reads `412.0 MB free`, not `0.4 GiB`."""
    from supervisor.units import size

    return size(free_gib_ * GIB)


def check_hf_cache() -> Check:
    env = dict(os.environ)
    cache = Path(env.get("HF_HUB_CACHE") or hf_home(env) / "hub").expanduser()
    free, where = free_gib(cache)
    msg = f"{cache}: {_size(free)} free (on {where})"
    if free < HF_CACHE_WARN_GIB:
        return Check("HF cache", WARN, msg + f"; under {HF_CACHE_WARN_GIB:.0f} GiB: an 8B base is 16 GB",
                     "point HF_HOME (or HF_HUB_CACHE) at a bigger disk")
    return Check("HF cache", OK, msg)


def check_runs_dir() -> Check:
    try:
        from supervisor import paths

        runs = paths.runs_dir()
    except Exception as e:  # noqa: BLE001 - a broken install is reported by its own check
        return Check("runs folder", WARN, f"cannot tell where runs go: {e}")
    free, where = free_gib(runs)
    msg = f"{runs}: {_size(free)} free (on {where}); checkpoints go to each recipe's output_dir"
    if free < RUNS_FAIL_GIB:
        return Check("runs folder", FAIL, msg, "free some space, or set QLORA_WATCH_HOME to a bigger disk")
    if free < RUNS_WARN_GIB:
        return Check("runs folder", WARN, msg, "set QLORA_WATCH_HOME to a bigger disk")
    return Check("runs folder", OK, msg)


def logind_kill_user_processes(root: Path = Path("/etc/systemd")) -> bool | None:
    """KillUserProcesses from logind.conf and its drop-ins (the last one wins); None if unset."""
    files = [root / "logind.conf", *sorted((root / "logind.conf.d").glob("*.conf"))]
    value: bool | None = None
    for f in files:
        try:
            lines = f.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, v = line.strip().partition("=")
            if key.strip() == "KillUserProcesses":
                value = v.strip().lower() in ("yes", "true", "1", "on")
    return value


def check_lingering() -> Check:
    """Does logout kill the supervisor? systemd-logind with KillUserProcesses and no linger does."""
    kill = logind_kill_user_processes()
    user = os.environ.get("USER") or str(os.getuid())
    linger: bool | None = None
    if shutil.which("loginctl"):
        try:
            res = subprocess.run(["loginctl", "show-user", user, "--property=Linger", "--value"],
                                 capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
            if res.returncode == 0 and res.stdout.strip():
                linger = res.stdout.strip() == "yes"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if linger:
        return Check("lingering", OK, f"linger is on for {user}: runs outlive your logins")
    if kill:
        return Check("lingering", FAIL, "logind has KillUserProcesses=yes and linger is off: "
                     "logging out kills the supervisor and the trainer",
                     f"loginctl enable-linger {user}")
    if linger is None:
        return Check("lingering", OK, "no systemd-logind session here (KillUserProcesses "
                     f"{'unset' if kill is None else 'no'}): logout does not kill runs")
    return Check("lingering", OK, f"KillUserProcesses is {'unset (default no)' if kill is None else 'no'}: "
                 "logout does not kill runs", f"to be safe anyway: loginctl enable-linger {user}")


# ------------------------------------------------------------------------------ the report


def run_checks() -> list[Check]:
    nvml, err = _nvml()
    driver, driver_cuda, gpus = check_driver(nvml, err)
    stack = probe_stack()
    return [
        check_supervisor_package(),
        driver,
        check_torch(stack, driver_cuda, gpus),
        check_bitsandbytes(stack, gpus),
        *check_optional(stack, gpus),
        check_hf_token(),
        check_hf_cache(),
        check_runs_dir(),
        check_lingering(),
    ]


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.message}")
        if c.fix and c.status != OK:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    lines.append(f"\n{fails} fail, {warns} warn, {len(checks) - fails - warns} ok")
    return "\n".join(lines)


def main(as_json: bool) -> int:
    """Print the checks; exit 1 when any failed, else 0."""
    checks = run_checks()
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        print(render(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0

"""Why did the trainer exit? One class per remedy (FIELD_NOTES 4, RELIABILITY_PLAN B).

Text only counts when the exit says so: "CUDA out of memory" printed by a run that exits 0
is data, not an OOM; only the final traceback (or a bitsandbytes native error line, which
has no traceback) of a non-zero exit is read.
"""

from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass, field

COMPLETED = "completed"
STOPPED = "stopped"
CUDA_OOM = "cuda_oom"
HOST_OOM_KILL = "host_oom_kill"
DISK_FULL = "disk_full"
CONFIG_ERROR = "config_error"
GPU_LOST = "gpu_lost"
CRASH = "crash"
RETRYABLE = frozenset({CUDA_OOM, HOST_OOM_KILL, CRASH})
KEEP_LINES = 50  # stderr lines an ExitClass keeps for the FAILED message (the whole tail is read)

_TB_HEAD = "Traceback (most recent call last):"
_OOM = re.compile(r"torch\.(cuda\.)?OutOfMemoryError|CUDA out of memory|CUBLAS_STATUS_ALLOC_FAILED")
# bitsandbytes CUDA_CHECK_RETURN: printf("Error %s at line %d in file %s\n", ...); exit(1)
_BNB = re.compile(r"^Error (?P<what>.+) at line \d+ in file \S+")
_BNB_OOM = re.compile(r"out of memory|alloc", re.IGNORECASE)
_ENOSPC = re.compile(r"No space left on device|ENOSPC|\[Errno 28\]|PytorchStreamWriter failed writing file")
_EXC = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s?(?P<msg>.*))?$")
# Exceptions that a relaunch cannot fix: the recipe, the data or the model is wrong.
_CONFIG_EXC = {
    "FileNotFoundError", "ModuleNotFoundError", "ImportError", "IsADirectoryError",
    "NotADirectoryError", "RecipeError", "RepositoryNotFoundError", "GatedRepoError",
    "RevisionNotFoundError", "EntryNotFoundError", "LocalEntryNotFoundError", "HFValidationError",
    "DataError", "JSONDecodeError", "DatasetNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError",
    "HandoffError",
}
# Messages that make an ordinary exception type a config error: a rejected argument or recipe
# key (trl/transformers renamed many), a model that is neither a folder nor a Hub id.
_CONFIG_MSG = re.compile(
    r"got an unexpected keyword argument|is not a local folder and is not a valid model identifier"
    r"|Some specified arguments are not used by the HfArgumentParser|does not appear to have a file named"
    r"|Unknown data format|unknown data format")
_ARGPARSE = re.compile(r"^\S+: error: ")  # argparse: usage, then 'prog: error: ...', exit 2
_EXEC_FAIL = re.compile(r"exec(ve)? failed|No such file or directory: .*python|Permission denied", re.I)


@dataclass
class ExitClass:
    """The verdict on one trainer exit, with the line that decided it."""

    kind: str
    summary: str  # one line for events: "CUDA out of memory (torch.OutOfMemoryError)"
    returncode: int | None = None
    signal: int | None = None
    confirmed: bool | None = None  # host_oom_kill: the kernel's oom_kill counter rose
    exception: str | None = None  # the final traceback's exception type
    detail: str | None = None  # the deciding line
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    def describe(self) -> str:
        """'cuda_oom: CUDA out of memory (torch.OutOfMemoryError)' for events and the log."""
        return f"{self.kind}: {self.summary}"


def _short(line: str, n: int = 300) -> str:
    return line if len(line) <= n else f"{line[: n - 3]}..."


def _signame(n: int) -> str:
    try:
        return _signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _tracebacks(lines: list[str]) -> list[list[str]]:
    """Every traceback in lines, oldest first, each up to the next header (or the end)."""
    # `in`, not startswith: a tqdm bar has no newline, so the header often ends its line
    starts = [i for i, x in enumerate(lines) if _TB_HEAD in x]
    return [[_TB_HEAD, *lines[a + 1:b]] for a, b in zip(starts, [*starts[1:], len(lines)], strict=False)]


# torch prefixes a rank's lines with '[rank0]:', torchrun's --tee with '[default0]:' (its role)
_RANK = re.compile(r"^\[(?:rank|default)(?P<rank>\d+)\]:[ ]?")
_LAUNCHER_EXC = ("ChildFailedError", "CalledProcessError")


def _is_launcher(tb: list[str]) -> bool:
    exc, _ = _exception_line(tb)
    return exc is not None and exc.endswith(_LAUNCHER_EXC)


def cause_traceback(lines: list[str], failed: bool = True) -> list[str]:
    """The traceback that explains the exit ([] if none): the final one, except that

    - a deep traceback (gradient checkpointing + peft: 150+ lines) can push its header out of
      the tail; Python still ends it with 'pkg.SomeError: message', so for a failed exit that
      last line stands alone (seen on the H200: a torch.OutOfMemoryError taken for a crash);
    - under `accelerate launch` / torchrun the final one is the launcher's own
      (ChildFailedError, then CalledProcessError) and the cause is in the ranks' tracebacks,
      printed before it: with '[rankN]:' / '[defaultN]:' prefixes, the first rank traceback
      that shows a CUDA OOM, else the first rank's, prefixes stripped; without prefixes, the
      last traceback that is not the launcher's."""
    tbs = _tracebacks(lines)
    if tbs:
        tb = tbs[-1]
    else:
        final = [x for x in lines if x.strip()][-1:]
        tb = final if failed and final and _EXC.match(final[0].strip()) else []
    if not _is_launcher(tb):
        return tb
    by_rank: dict[str, list[str]] = {}
    for line in lines:
        m = _RANK.match(line)
        if m:
            by_rank.setdefault(m.group("rank"), []).append(line[m.end():])
    ranks = [found[-1] for found in map(_tracebacks, by_rank.values()) if found]
    if ranks:
        return next((r for r in ranks if _OOM.search("\n".join(r))), ranks[0])
    return next((t for t in reversed(tbs) if not _is_launcher(t)), tb)


def _exception_line(tb: list[str]) -> tuple[str | None, str | None]:
    """(type, line) of the traceback's exception: the last line shaped like 'pkg.FooError: msg'."""
    for line in reversed(tb):
        m = _EXC.match(line.strip())
        if m:
            return m.group("type"), line.strip()
    return None, None


def _signal_of(returncode: int | None, sig: int | None) -> int | None:
    if sig:
        return sig
    if returncode is not None and returncode < 0:
        return -returncode
    if returncode is not None and 128 < returncode < 128 + 65:  # a shell's 128+N
        return returncode - 128
    return None


def classify_exit(
    returncode: int | None,
    signal: int | None,
    stderr_tail: list[str],
    oom_kill_delta: int | None = None,
    gpu_lost: bool = False,
    disk_full_hint: bool = False,
    stop_requested: bool = False,
    spawn_error: str | None = None,
) -> ExitClass:
    """Classify a trainer exit; see the module docstring for which text counts. `stderr_tail`
    is read whole: the wrapper keeps its last wrapper.TAIL_LINES lines, enough for a deep
    traceback's header."""
    tail = [line.rstrip("\r\n") for line in stderr_tail]
    sig = _signal_of(returncode, signal)

    def out(kind: str, summary: str, **kw: object) -> ExitClass:
        return ExitClass(kind=kind, summary=summary, returncode=returncode, signal=sig,
                         stderr_tail=tail[-KEEP_LINES:], **kw)  # type: ignore[arg-type]

    if gpu_lost:
        return out(GPU_LOST, "GPU lost (fell off the bus): reboot required")
    if spawn_error:  # the exit-file wrapper could not exec the trainer
        return out(CONFIG_ERROR, f"could not start the trainer: {spawn_error}", detail=spawn_error)
    if stop_requested:
        return out(STOPPED, "stopped on request" + (f" ({_signame(sig)})" if sig else ""))
    if returncode == 0 and not sig:
        return out(COMPLETED, "exited 0")
    if returncode is None and sig is None:
        return out(CRASH, "exit status unknown")

    tb = cause_traceback(tail, failed=returncode not in (0, None))
    exc, exc_line = _exception_line(tb)
    tb_text = "\n".join(tb)
    # bnb's native error has no traceback; only a line at the very end counts.
    last = [x for x in tail if x.strip()][-5:]
    bnb = next((x.strip() for x in reversed(last) if _BNB.match(x.strip())), None) if not tb else None

    if disk_full_hint or _ENOSPC.search(tb_text) or (bnb is None and not tb and any(_ENOSPC.search(x) for x in last)):
        line = next((x.strip() for x in reversed(tb or last) if _ENOSPC.search(x)), None)
        return out(DISK_FULL, "disk full (No space left on device)", exception=exc, detail=line)
    if sig == _signal.SIGKILL and (oom_kill_delta or 0) > 0 or sig == _signal.SIGKILL and not tb \
            and oom_kill_delta is None:
        # the kernel's oom_kill count: risen, a confirmed host OOM; unreadable, possibly one;
        # unmoved, someone's SIGKILL (a user, a scheduler, a watchdog): below, not an OOM
        confirmed = (oom_kill_delta or 0) > 0
        summary = (f"killed by the kernel OOM killer (oom_kill +{oom_kill_delta})" if confirmed
                   else "killed by signal 9 (possible host OOM)")
        return out(HOST_OOM_KILL, summary, confirmed=confirmed)
    if sig == _signal.SIGKILL:
        return out(CRASH, "killed by signal 9", exception=exc, detail=exc_line)
    if sig:
        return out(CRASH, f"killed by {_signame(sig)}", exception=exc, detail=exc_line)
    if tb and _OOM.search(tb_text):
        line = next((x.strip() for x in reversed(tb) if _OOM.search(x)), exc_line)
        return out(CUDA_OOM, f"CUDA out of memory ({exc or 'CUDA error'})", exception=exc, detail=line)
    if bnb is not None and returncode == 1:
        m = _BNB.match(bnb)
        if m and _BNB_OOM.search(m.group("what")):
            return out(CUDA_OOM, "CUDA out of memory (bitsandbytes native error)", detail=bnb)
        return out(CRASH, "bitsandbytes native CUDA error", detail=bnb)
    if tb and "killed by signal" in tb_text and (oom_kill_delta or 0) > 0:
        # A DataLoader worker taken by the OOM killer surfaces as a RuntimeError in the parent.
        return out(HOST_OOM_KILL, f"a worker was killed by the kernel OOM killer (oom_kill +{oom_kill_delta})",
                   confirmed=True, exception=exc, detail=exc_line)
    if exc is not None and (exc.rsplit(".", 1)[-1] in _CONFIG_EXC or _CONFIG_MSG.search(exc_line or "")):
        return out(CONFIG_ERROR, f"configuration error: {_short(exc_line or exc)}", exception=exc,
                   detail=exc_line)
    if returncode == 2 and not tb and last and _ARGPARSE.match(last[-1].strip()):
        return out(CONFIG_ERROR, f"the command rejected its arguments: {_short(last[-1].strip())}",
                   detail=last[-1].strip())
    if returncode in (126, 127) or (not tb and any(_EXEC_FAIL.search(x) for x in last)):
        return out(CONFIG_ERROR, f"could not start the trainer (exit {returncode})", detail=last[-1] if last else None)
    if exc:
        return out(CRASH, f"crashed: {_short(exc_line or exc, 200)}", exception=exc, detail=exc_line)
    return out(CRASH, f"exited {returncode}", detail=last[-1] if last else None)

"""Checkpoint facts and the retention plan: pure functions, no I/O (the guards use these).

`checkpoints.py` reads folders into `CheckpointInfo`s and carries deletions out; this module
only decides. Names follow the HF Trainer: `checkpoint-N`; a checkpoint set aside as
incomplete is `checkpoint-N.incomplete-<ts>` (no longer matched by transformers'
`get_last_checkpoint`, so nothing resumes from it by accident).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
QUARANTINED_RE = re.compile(r"^checkpoint-(\d+)\.incomplete-(\d+)$")
# The only names safe_delete may remove: a checkpoint, a quarantined one, or a pending delete.
DELETABLE_RE = re.compile(r"^checkpoint-\d+(\.incomplete-\d+)?$")
PENDING_DELETE_RE = re.compile(r"^checkpoint-\d+(\.incomplete-\d+)?\.deleting-\d+$")


@dataclass
class CheckpointInfo:
    """What qlora-watch knows about one `checkpoint-N` folder."""

    name: str
    step: int
    complete: bool
    reason: str | None = None  # why not complete, in words shown to users
    size_bytes: int = 0
    mtime: float = 0.0
    path: Path | None = None  # absolute folder path (the core uses path.name)
    best_metric: float | None = None
    best_checkpoint: str | None = None  # basename of trainer_state's best_model_checkpoint
    run_id: str | None = None  # from the run marker the supervisor wrote into it
    quarantined: bool = False  # renamed checkpoint-N.incomplete-<ts>

    @property
    def target(self) -> str:
        """What to pass as resume_from: the absolute path when known, else the name."""
        return str(self.path) if self.path else self.name


def step_of(name: str) -> int | None:
    """checkpoint-120 -> 120; checkpoint-120.incomplete-17 -> 120; anything else -> None."""
    m = CHECKPOINT_RE.match(name) or QUARANTINED_RE.match(name)
    return int(m.group(1)) if m else None


def as_info(obj: CheckpointInfo | Mapping[str, Any]) -> CheckpointInfo:
    """Accept a CheckpointInfo or a dict with the same keys (the core may send either)."""
    if isinstance(obj, CheckpointInfo):
        return obj
    d = dict(obj)
    name = str(d.get("name") or f"checkpoint-{d['step']}")
    step = d.get("step")
    if step is None:
        step = step_of(name)
    return CheckpointInfo(
        name=name,
        step=int(step if step is not None else -1),
        complete=bool(d.get("complete", False)),
        reason=d.get("reason"),
        size_bytes=int(d.get("size_bytes") or 0),
        mtime=float(d.get("mtime") or 0.0),
        path=Path(d["path"]) if d.get("path") else None,
        best_metric=d.get("best_metric"),
        best_checkpoint=d.get("best_checkpoint"),
        run_id=d.get("run_id"),
        quarantined=bool(d.get("quarantined", QUARANTINED_RE.match(name) is not None)),
    )


def as_infos(items: Iterable[CheckpointInfo | Mapping[str, Any]]) -> list[CheckpointInfo]:
    """Normalised and in numeric step order (checkpoint-9900 before checkpoint-10000)."""
    return sorted((as_info(x) for x in items), key=lambda i: (i.step, i.name))


def _ours(info: CheckpointInfo, run_id: str | None, strict: bool) -> bool:
    """Belongs to run_id? strict: the marker must name it; else unmarked ones count too."""
    if run_id is None:
        return True
    if info.run_id is None:
        return not strict
    return info.run_id == run_id


def newest_complete_of(
    infos: Iterable[CheckpointInfo | Mapping[str, Any]],
    run_id: str | None = None,
    before_step: int | None = None,
) -> CheckpointInfo | None:
    """The complete, non-quarantined checkpoint with the highest step.

    With run_id, only checkpoints whose marker names that run (unmarked ones are skipped:
    they may be another run's leftovers). With before_step, only steps < before_step.
    """
    best: CheckpointInfo | None = None
    for info in as_infos(infos):
        if not info.complete or info.quarantined or not _ours(info, run_id, strict=True):
            continue
        if before_step is not None and info.step >= before_step:
            continue
        best = info
    return best


def best_name_of(infos: Iterable[CheckpointInfo | Mapping[str, Any]]) -> str | None:
    """The best checkpoint's name as the newest complete checkpoint's trainer state says."""
    newest = newest_complete_of(infos)
    return newest.best_checkpoint if newest else None


def in_progress(info: CheckpointInfo, newest: CheckpointInfo | None) -> bool:
    """Incomplete and newer than the newest complete one: probably being written now."""
    if info.complete or info.quarantined:
        return False
    return newest is None or info.step > newest.step


def prune_plan(
    infos: Iterable[CheckpointInfo | Mapping[str, Any]],
    keep: int,
    protect: set[str] | frozenset[str] = frozenset(),
    *,
    keep_best: bool = True,
    run_id: str | None = None,
) -> list[CheckpointInfo]:
    """What to delete so that at most `keep` complete checkpoints remain.

    Never deletes: the newest complete checkpoint, the best one (when keep_best), any name in
    `protect`, one being written (see in_progress), or one whose marker names another run.
    Deletes the oldest eligible complete checkpoints, no more than needed to get down to
    `keep`; incomplete ones older than the newest complete (and quarantined ones) are
    garbage and always eligible. Protected complete ones still count toward `keep`.
    """
    all_infos = [i for i in as_infos(infos) if _ours(i, run_id, strict=False)]
    newest = newest_complete_of(all_infos)
    best = newest.best_checkpoint if (newest and keep_best) else None
    guarded = set(protect) | ({best} if best else set()) | ({newest.name} if newest else set())

    complete = [i for i in all_infos if i.complete and not i.quarantined]
    excess = len(complete) - max(keep, 1)
    plan: list[CheckpointInfo] = []
    for info in complete:  # oldest first
        if excess <= 0:
            break
        if info.name in guarded:
            continue
        plan.append(info)
        excess -= 1
    for info in all_infos:
        if info.complete and not info.quarantined:
            continue
        if info.name in guarded or in_progress(info, newest):
            continue
        plan.append(info)
    return sorted(plan, key=lambda i: (i.step, i.name))

"""`qlora-watch rm`: delete an ended run's records, and with --checkpoints the checkpoint folders
it made (only those: checkpoints/delete.py's symlink-safe delete, the run marker checked)."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

from supervisor.store import read_json
from supervisor.units import size


class RemoveError(Exception):
    """The run cannot be removed (live, not a run folder, output folder not this run's)."""


def _live_reason(run_dir: Path) -> str | None:
    """Why the run must not be removed now, or None."""
    from supervisor.control.runs import supervisor_running
    from supervisor.states import RunState
    from supervisor.store import RunStore

    store = RunStore(run_dir)
    state = (read_json(run_dir / "state.json") or {}).get("state")
    if supervisor_running(store):
        return "its supervisor is running"
    if state is None:
        age = time.time() - float((read_json(run_dir / "run.json") or {}).get("created_at") or 0)
        return None if age > 60 else "it was created less than a minute ago and may be starting"
    try:
        live = RunState(state).live
    except ValueError:
        return None  # an unknown state cannot be a running one we know of
    return f"it is {state} (stop it first: qlora-watch stop {run_dir.name})" if live else None


def _ckpt_targets(run_dir: Path) -> tuple[Path | None, list[Path], list[str]]:
    """(output dir, folders to delete in it, notes on what is kept and why)."""
    from supervisor.checkpoints.folders import output_dir_owner
    from supervisor.checkpoints.plan import DELETABLE_RE, PENDING_DELETE_RE

    info = read_json(run_dir / "run.json") or {}
    out = Path(info["output_dir"]) if info.get("output_dir") else None
    if out is None or not out.is_dir():
        return out, [], [f"output folder {out} not found: no checkpoints to delete"] if out else []
    owner, run_id = output_dir_owner(out), info.get("run_id") or run_dir.name
    if owner != run_id:
        who = f"run {owner}" if owner else "no qlora-watch run (no manifest)"
        return out, [], [f"{out} belongs to {who}, not {run_id}: its checkpoints are kept"]
    targets, notes = [], []
    for p in sorted(out.iterdir()):
        n = p.name
        if DELETABLE_RE.match(n) or PENDING_DELETE_RE.match(n) or n == "adapter":
            targets.append(p)
        elif n.startswith("attempt-") and n[8:].isdigit():
            if output_dir_owner(p) == run_id:
                targets.append(p)
            else:
                notes.append(f"{p} is not marked as {run_id}'s: kept")
    return out, targets, notes


def describe_removal(run_dir: Path, with_checkpoints: bool) -> str:
    """What remove_run would delete, for the confirmation prompt."""
    from supervisor.checkpoints.folders import dir_size

    run_dir = Path(run_dir)
    lines = []
    why = _live_reason(run_dir)
    if why:
        lines.append(f"refused: run {run_dir.name} is live ({why})")
    lines.append(f"delete the run's records {run_dir} ({dir_size(run_dir) / 1e6:,.1f} MB)")
    if with_checkpoints:
        out, targets, notes = _ckpt_targets(run_dir)
        for p in targets:
            lines.append(f"delete {p} ({size(dir_size(p))})")
        lines += notes
        if out is not None:
            lines.append(f"keep everything else in {out} (tensorboard logs, your files)")
    else:
        out = (read_json(run_dir / "run.json") or {}).get("output_dir")
        lines.append(f"keep checkpoints and adapter in {out} (--checkpoints deletes them)")
    return "\n".join(lines)


def _rm_entry(parent: Path, name: str) -> None:
    """Delete parent/name without following symlinks (a link is unlinked, its target kept)."""
    from supervisor.checkpoints.delete import SafeDir

    with SafeDir.open(parent) as sd:
        sd.verify()
        st = os.stat(name, dir_fd=sd.fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=sd.fd)
            return
        if st.st_dev != sd.dev:
            raise OSError(f"{parent / name} is on another filesystem (a mount point?): not deleted")
        shutil.rmtree(name, dir_fd=sd.fd)


def remove_run(run_dir: Path, with_checkpoints: bool) -> list[str]:
    """Delete a finished run's records (and its checkpoints/adapters when asked); returns the paths."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or not (run_dir / "run.json").is_file():
        raise RemoveError(f"{run_dir}: not a qlora-watch run folder")
    why = _live_reason(run_dir)
    if why:
        raise RemoveError(f"run {run_dir.name} is live: {why}")
    removed: list[str] = []
    if with_checkpoints:  # first: on a failure the records still say where the checkpoints are
        _out, targets, _notes = _ckpt_targets(run_dir)
        errors = []
        for p in targets:
            try:
                _rm_entry(p.parent, p.name)
                removed.append(str(p))
            except OSError as e:
                errors.append(f"{p}: {e}")
        if errors:
            raise RemoveError("could not delete: " + "; ".join(errors) + f" (the records in {run_dir} are kept)")
    _rm_entry(run_dir.parent, run_dir.name)
    removed.append(str(run_dir))
    return removed

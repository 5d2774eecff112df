"""A model download is progress, not a stall.

The loading phase's stall limit (`guards.stall.loading_s`, 3,600 s) includes the Hub download:
a 70B bf16 download (~141 GB) below ~39 MB/s would be relaunched mid-download. While the
trainer loads, bytes arriving in the Hugging Face cache (`blobs/*.incomplete` growing, the xet
chunk cache filling) count as progress for the stall guard; the state carries the download
(bytes, rate, ETA when the size is known) for `status` ("downloading") and the dashboard's
header. Where the Hub metadata is already cached (a `*.safetensors.index.json` with its
`total_size`), the cache's disk is checked against what is left to download, at launch and
when the index arrives.

Stdlib only; the folder scan runs off the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from supervisor.records import EventKind
from supervisor.units import size

log = logging.getLogger("qlora-watch.download")

POLL_S = 2.0  # how often the cache is measured while loading
ACTIVE_S = 30.0  # a download with no new bytes for this long is no longer shown as one
DISK_MARGIN = 1.05


def hub_cache(env: Mapping[str, str]) -> Path:
    """huggingface_hub's cache folder for this environment (its own precedence)."""
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(k):
            return Path(env[k]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def xet_cache(env: Mapping[str, str]) -> Path:
    if env.get("HF_XET_CACHE"):
        return Path(env["HF_XET_CACHE"]).expanduser()
    return hub_cache(env).parent / "xet" if not env.get("HF_HOME") else Path(env["HF_HOME"]).expanduser() / "xet"


def repo_folder(model: str | None) -> str | None:
    """`models--org--name` for a Hub id; None for a local path or no model."""
    if not model or model.startswith((".", "/", "~")) or os.path.exists(model) or model.count("/") > 1:
        return None
    return "models--" + model.replace("/", "--")


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under path (symlinks not followed: snapshots link to blobs)."""
    total = 0
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            with os.scandir(p) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def expected_total(repo: Path) -> int | None:
    """The weights' size from a cached `*.safetensors.index.json` (`metadata.total_size`)."""
    best = None
    for idx in repo.glob("snapshots/*/*.safetensors.index.json"):
        try:
            n = int(json.loads(idx.read_text())["metadata"]["total_size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        best = max(best or 0, n)
    return best


def disk_shortfall(repo: Path, total: int, present: int) -> str | None:
    """A message when the cache's disk cannot hold what is left to download."""
    need = max(0, total - present)
    p = repo
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return None
    if need == 0 or free >= need * DISK_MARGIN:
        return None
    return (f"the model download needs about {size(need)} more in {repo.parent} but only "
            f"{size(free)} is free there: free some space, or set HF_HOME to a bigger disk")


def describe(d: Mapping[str, Any] | None) -> str | None:
    """'downloading the model: 1.2 GB of 3.4 GB at 45.0 MB/s, ETA 49 s' (None: no download)."""
    if not d or not d.get("active"):
        return None
    got = d.get("bytes") or 0
    text = f"downloading the model: {size(got)}"
    if d.get("total"):
        text += f" of {size(d['total'] - (d.get('present_at_start') or 0))}"
    if d.get("rate_bps"):
        text += f" at {size(d['rate_bps'])}/s"
    eta = d.get("eta_s")
    if isinstance(eta, (int, float)):
        text += f", ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
    return text


@dataclass
class _Watch:
    paths: list[Path]
    repo: Path | None
    start_bytes: int
    total: int | None
    last_bytes: int
    last_t: float
    rate: float | None = None
    checked_total: bool = False


class DownloadTracker:
    """The supervisor's part: measure the cache while the trainer loads, record progress."""

    def __init__(self, io: Any):  # the core's RunIO (not imported: the dashboard imports describe)
        self.io = io  # the status (phase, download), set_state, record
        self.watch: _Watch | None = None
        self._last_poll = 0.0
        self._busy = False

    def on_launch(self, env: Mapping[str, str], model: str | None) -> None:
        """A new attempt: the folders to measure, the baseline, and the disk check."""
        hub = hub_cache(env)
        name = repo_folder(model)
        repo = hub / name if name else None
        paths = [repo] if repo else [hub]
        paths.append(xet_cache(env))
        self.watch = None
        try:
            start = sum(folder_bytes(p) for p in paths)
        except Exception:  # noqa: BLE001 - never stop a launch over a cache scan
            return
        total = expected_total(repo) if repo else None
        self.watch = _Watch(paths=paths, repo=repo, start_bytes=start, total=total,
                            last_bytes=start, last_t=time.time())
        self.io.set_state(download=None, persist=False)
        self._check_disk(self.watch, folder_bytes(repo) if repo else 0)

    def _check_disk(self, w: _Watch, present: int) -> None:
        if w.checked_total or w.total is None or w.repo is None:
            return
        w.checked_total = True
        msg = disk_shortfall(w.repo, w.total, present)
        if msg:
            self.io.record(EventKind.DOWNLOAD_DISK_LOW, msg, level="warning")

    async def tick(self) -> None:
        from supervisor.states import RunState

        w = self.watch
        if w is None or self._busy or time.monotonic() - self._last_poll < POLL_S:
            return
        st = self.io.status
        loading = (st.run_state in (RunState.STARTING, RunState.LOADING)
                   and st.phase in (None, "loading_model", "tokenising"))
        if not loading:
            d = st.download
            if d and d.get("active"):  # the last bytes arrived after the last poll
                got = await asyncio.to_thread(lambda: sum(folder_bytes(p) for p in w.paths))
                got = max(int(d.get("bytes") or 0), got - w.start_bytes)
                self.io.set_state(download={**d, "bytes": got, "active": False, "eta_s": None})
                self.io.record(EventKind.DOWNLOAD_SEEN, f"model download done: {size(got)}")
            self.watch = None
            return
        self._last_poll = time.monotonic()
        self._busy = True
        try:
            now_bytes = await asyncio.to_thread(lambda: sum(folder_bytes(p) for p in w.paths))
            repo_bytes = await asyncio.to_thread(folder_bytes, w.repo) if w.repo else now_bytes
        except Exception as e:  # noqa: BLE001
            log.warning("download scan failed: %s", e)
            return
        finally:
            self._busy = False
        now = time.time()
        if w.repo is not None and w.total is None:
            w.total = expected_total(w.repo)  # the index arrives first: the size is known from here
            if w.total is not None:
                self._check_disk(w, repo_bytes)
        prev = st.download or {}
        if now_bytes > w.last_bytes:
            inst = (now_bytes - w.last_bytes) / max(1e-3, now - w.last_t)
            w.rate = inst if w.rate is None else 0.7 * w.rate + 0.3 * inst
            eta = (max(0, w.total - repo_bytes) / w.rate) if w.total and w.rate else None
            d = {"active": True, "bytes": now_bytes - w.start_bytes, "total": w.total,
                 "present_at_start": w.start_bytes if w.repo else None,
                 "rate_bps": round(w.rate, 1), "eta_s": eta, "progress_t": now,
                 "path": str(w.paths[0])}
            if not prev.get("active"):
                self.io.record(EventKind.DOWNLOAD_SEEN, f"the trainer is downloading the model into {w.paths[0]}")
            w.last_bytes, w.last_t = now_bytes, now
            self.io.set_state(download=d)
        elif prev.get("active") and now - float(prev.get("progress_t") or now) > ACTIVE_S:
            self.io.set_state(download={**prev, "active": False, "rate_bps": None, "eta_s": None})

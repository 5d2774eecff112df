"""The tokenised-dataset cache: trl's prepared dataset, before truncation, kept for relaunches.

Every attempt of a run tokenises the same records with the same tokenizer: an OOM-ladder rung,
a crash relaunch and `qlora-watch resume` change the sequence length or the adapter, never the
tokens. trl prepares a dataset in one pass (chat template or EOS, tokenise, labels from the
masks, then truncate to max_length or pack), and a dataset that already has `input_ids` and
`labels` goes straight to the truncate-or-pack step. So the first attempt runs trl's own
preparation without a max_length and without packing, saves that (`save_to_disk`, Arrow), and
every attempt (the first included) hands it to trl, which truncates or packs it for its own
max_length exactly as in one pass. Measured: 1.8 s of the 8B relaunch for 64 records of 4,200
tokens; for a real dataset it is the tokenisation itself, minutes for a few hundred thousand
records.

Layout: ROOT/KEY/ holds the dataset's files and `dcache.json` (the key's inputs, rows, files
with size and sha256, and their stat as hashed). It is written beside it and renamed into
place. The key covers what decides the tokens: the data file (path, size, mtime, inode), the
format and max_samples, the model the tokenizer comes from (qcache.model_revision), the
tokenizer's special tokens and chat template as loaded, trl's settings that shape the
preparation, and the versions of trl, transformers, tokenizers and datasets. An entry whose
files are not as recorded is hashed; one that fails, or does not load, is set aside
(KEY.bad-TIME) with a notice and the records are tokenised again: never the wrong tokens.

ROOT is `$QLW_DCACHE_DIR` (the supervisor sets it to the run's `dcache/`, removed with the run;
`data.cache = false` leaves it unset); without it nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from supervisor.runner.qcache import commit_entry, file_stat, sha256_file, stats_of

FORMAT = "1"
MANIFEST = "dcache.json"
ENV_DIR = "QLW_DCACHE_DIR"
LIBS = ("trl", "transformers", "tokenizers", "datasets", "qlora-watch")  # ours: how records are read
MAX_BYTES = 8 << 30  # a prepared dataset bigger than this is not copied to disk


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def data_identity(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(path).expanduser()
    st = file_stat(p)
    if st is None:
        return None
    return {"path": str(p.resolve()), "stat": st[:2] + st[3:]}  # size, mtime, inode, device


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What of the loaded tokenizer decides its tokens besides the model it came from."""
    template = getattr(tokenizer, "chat_template", None)
    return {
        "class": type(tokenizer).__name__,
        "vocab": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "special": {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "chat_template": hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest(),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }


def key_inputs(*, data: dict[str, Any] | None, data_format: str, max_samples: int | None,
               model: dict[str, Any] | None, backend: str, tokenizer: Any,
               settings: dict[str, Any]) -> dict[str, Any] | None:
    """None when the data file or the model cannot be identified (then nothing is cached)."""
    if data is None or model is None:
        return None
    return {"format": FORMAT, "data": data, "data_format": data_format, "max_samples": max_samples,
            "model": model, "backend": backend, "tokenizer": tokenizer_identity(tokenizer),
            "settings": settings, "versions": _versions()}


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


class DatasetCache:
    """One cache root; `writer` is the trainer's EventWriter (notices)."""

    def __init__(self, root: str | os.PathLike[str], writer: Any = None) -> None:
        self.root = Path(root).expanduser()
        self.writer = writer

    def _notice(self, message: str, **fields: Any) -> None:
        if self.writer is not None:
            self.writer.notice(message, **fields)

    def _set_aside(self, entry: Path, why: str) -> None:
        dest = entry.with_name(f"{entry.name}.bad-{int(time.time())}")
        try:
            os.replace(entry, dest)
        except OSError:
            shutil.rmtree(entry, ignore_errors=True)
        self._notice(f"dataset cache: entry {entry.name} not used ({why}); tokenising the records again",
                     cache_fallback=why)

    def load(self, inputs: dict[str, Any]) -> Any | None:
        """The prepared dataset for exactly these inputs, or None (no entry, or a bad one)."""
        key = cache_key(inputs)
        entry = self.root / key
        if not entry.is_dir():
            return None
        try:
            manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._set_aside(entry, f"{MANIFEST} missing or unreadable")
            return None
        if manifest.get("inputs") != json.loads(json.dumps(inputs, default=str)):
            self._set_aside(entry, "made for other inputs")
            return None
        files = manifest.get("files") or {}
        now = stats_of(entry, files)
        for name, info in files.items():
            if now[name] is None or now[name][0] != info.get("size"):
                self._set_aside(entry, f"{name}: missing or not its recorded size")
                return None
        if any(now[n] != (manifest.get("stat") or {}).get(n) for n in files):
            bad = [n for n, info in files.items() if sha256_file(entry / n) != info.get("sha256")]
            if bad:
                self._set_aside(entry, f"{bad[0]}: sha256 differs from the manifest")
                return None
        try:
            from datasets import load_from_disk

            ds = load_from_disk(str(entry / "data"))
            if len(ds) != manifest.get("rows"):
                raise ValueError(f"{len(ds)} rows, the manifest says {manifest.get('rows')}")
        except Exception as e:  # noqa: BLE001 - a broken entry costs a tokenisation, not the run
            self._set_aside(entry, f"{type(e).__name__}: {str(e)[:200]}")
            return None
        return ds

    def save(self, inputs: dict[str, Any], dataset: Any) -> Path | None:
        """Write ROOT/KEY atomically; None (and a notice) when it cannot. Never raises."""
        key = cache_key(inputs)
        final = self.root / key
        if (final / MANIFEST).is_file():
            return final
        size = int(getattr(getattr(dataset, "data", None), "nbytes", 0) or 0)
        if size > MAX_BYTES:
            self._notice(f"dataset cache: the prepared dataset is {size / 2**30:.1f} GiB, over the "
                         f"{MAX_BYTES >> 30} GiB the cache copies; every attempt tokenises it")
            return None
        tmp = self.root / f".tmp-{key}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.rmtree(tmp, ignore_errors=True)
            dataset.save_to_disk(str(tmp / "data"))
            names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            files = {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in names}
            manifest = {"inputs": inputs, "rows": len(dataset), "files": files,
                        "bytes": sum(f["size"] for f in files.values()), "created_at": time.time(),
                        "stat": stats_of(tmp, names)}
            commit_entry(tmp, final, MANIFEST, manifest, names)
        except Exception as e:  # noqa: BLE001 - a failed save costs speed, never the run
            shutil.rmtree(tmp, ignore_errors=True)
            self._notice(f"dataset cache: not saved ({type(e).__name__}: {str(e)[:200]}); later "
                         "attempts tokenise again")
            return None
        return final

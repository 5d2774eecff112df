"""The quantised-weight cache: the base model as bitsandbytes serialises it, for fast relaunches.

The first attempt of a run quantises the bf16 weights to NF4 while it loads them (minutes for a
70B model) and then saves the quantised base model (before the LoRA adapter is applied) with
`save_pretrained`: transformers 5 writes bitsandbytes 4-bit weights pre-quantised (packed uint8
plus their quant state), about a quarter of the bf16 bytes, and `from_pretrained` on that folder
loads them as they are, with no quantisation pass (`Bnb4BitHfQuantizer`, `pre_quantized`).
Later attempts of the run (OOM-ladder rungs, crash relaunches, `qlora-watch resume`) load from it.

Layout: ROOT/KEY/ holds the model files, the tokenizer and `qcache.json` (the manifest: the key's
inputs and every file's size and sha256). It is written in ROOT/.tmp-KEY-PID and renamed into
place, so a folder named KEY is always complete. The key covers everything that decides what the
quantised weights are: the model's revision (the hub snapshot's commit, or for a local folder a
digest of its config.json and its files' sizes and mtimes), the dtype, the quantisation settings,
the backend (hf or unsloth), the device kind and the library versions.

Every load checks sizes and safetensors headers. The sha256 of every file is checked beside the
load unless the files are provably the ones that were hashed: the manifest records each file's
stat (size, mtime, ctime, inode, device) as it was hashed at the save, and `verified.json` the
stat at the last sha256 that passed; a file with another stat (rewritten, truncated, replaced,
copied) is hashed again (`QLW_QCACHE_VERIFY=always` hashes at every load).
A cache that does not match, or whose files fail the size, safetensors-header or sha256 check, is
never loaded as the model: the trainer says why in a notice and loads the original weights. A bad
entry is renamed KEY.bad-TIME (kept for a look; `qlora-watch cache rm` removes it).

ROOT is `$QLW_QCACHE_DIR` (the supervisor sets it: the run's own folder, or the shared cache for
`model.weight_cache = "shared"`); without it the trainer caches nothing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_FORMAT = "1"  # bump when the layout or the key's meaning changes
MANIFEST = "qcache.json"
ENV_DIR = "QLW_QCACHE_DIR"
ENV_VERIFY = "QLW_QCACHE_VERIFY"  # "always": hash every file at every load, even when unchanged
LIBS = ("torch", "transformers", "bitsandbytes", "peft")
CHUNK = 8 << 20


# ------------------------------------------------------------------------------ the key


def folder_digest(folder: Path) -> str:
    """sha256 of config.json's bytes and every file's relative path, size and mtime (ns)."""
    h = hashlib.sha256()
    cfg = folder / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"no config.json")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        st = p.stat()
        h.update(f"{rel.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def model_revision(name: str) -> dict[str, Any] | None:
    """What the weights are: a local folder's digest, or the hub snapshot's commit; None when
    neither can be told without a download (the cache is then skipped for this attempt)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return {"kind": "folder", "path": str(p.resolve()), "digest": folder_digest(p)}
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a repo id, or no hub client
        return None
    if not isinstance(hit, str):
        return None
    snapshot = Path(hit).parent  # .../models--org--name/snapshots/<commit>/config.json
    return {"kind": "hub", "repo": name, "commit": snapshot.name}


def original_config(name: str) -> Path | None:
    """The source's config.json on local disk, or None."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p / "config.json" if (p / "config.json").is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001
        return None
    return Path(hit) if isinstance(hit, str) else None


def lib_versions(backend: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in LIBS + (("unsloth", "unsloth_zoo") if backend == "unsloth" else ()):
        mod = sys.modules.get(name)
        version = getattr(mod, "__version__", None) if mod is not None else None
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = "absent"
        out[name] = str(version)
    return out


def key_inputs(recipe: Any, path: str, backend: str, device: str,
               versions: dict[str, str] | None = None,
               revision: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Everything that decides the quantised weights; None when the cache does not apply."""
    if not recipe.quant.load_in_4bit:
        return None
    rev = revision if revision is not None else model_revision(path)
    if rev is None:
        return None
    q = recipe.quant
    return {
        "format": CACHE_FORMAT,
        "model": rev,
        "dtype": recipe.model.dtype,
        "trust_remote_code": recipe.model.trust_remote_code,
        "quant": {"quant_type": q.quant_type, "double_quant": q.double_quant,
                  "compute_dtype": q.compute_dtype},
        "backend": backend,
        "device": device,
        "versions": versions if versions is not None else lib_versions(backend),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def why_off(recipe: Any) -> str | None:
    """Why this recipe caches nothing, or None."""
    if getattr(recipe.model, "weight_cache", "run") == "off":
        return 'model.weight_cache = "off"'
    if not recipe.quant.load_in_4bit:
        return "quant.load_in_4bit = false (nothing is quantised)"
    if recipe.hardware.gpus > 1:
        return "hardware.gpus > 1 (FSDP-QLoRA loads on every rank; not cached yet)"
    return None


# ------------------------------------------------------------------------------ checks


def safetensors_problem(path: Path) -> str | None:
    """None when the file's header parses and its tensors end exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: {size} bytes, shorter than a safetensors header"
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                return f"{path.name}: header length {n} exceeds the file"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name}: unreadable header ({e})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name}: {size} bytes, its header says {8 + n + end} (truncated or padded)"
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])  # large updates release the GIL: shards hash in parallel
    return h.hexdigest()


def read_manifest(entry: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def quick_problem(entry: Path, inputs: dict[str, Any]) -> str | None:
    """Manifest present and matching, every file there at its size, safetensors headers sound."""
    m = read_manifest(entry)
    if m is None:
        return f"{MANIFEST} missing or unreadable"
    if m.get("inputs") != inputs:
        diff = sorted(k for k in set(inputs) | set(m.get("inputs") or {})
                      if (m.get("inputs") or {}).get(k) != inputs.get(k))
        return f"made for other inputs ({', '.join(diff)})"
    files = m.get("files") or {}
    if not any(n.endswith(".safetensors") for n in files):
        return "no safetensors file listed"
    for name, info in files.items():
        p = entry / name
        try:
            size = p.stat().st_size
        except OSError:
            return f"{name} missing"
        if size != info.get("size"):
            return f"{name}: {size} bytes, the manifest says {info.get('size')}"
        if name.endswith(".safetensors"):
            bad = safetensors_problem(p)
            if bad:
                return bad
    return None


def hash_problems(entry: Path, manifest: dict[str, Any], workers: int = 8) -> list[str]:
    """sha256 of every listed file against the manifest (files in parallel)."""
    files = manifest.get("files") or {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as ex:
        got = dict(zip(files, ex.map(lambda n: sha256_file(entry / n), files), strict=True))
    return [f"{n}: sha256 differs from the manifest" for n, info in files.items()
            if got[n] != info.get("sha256")]


STAT_FIELDS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
VERIFIED = "verified.json"  # the files' stat at the last sha256 that passed (after the save's own)


def file_stat(path: Path) -> list[int] | None:
    """What says a file is the one that was hashed: size, mtime, ctime, inode, device. Any write,
    truncation, replacement or copy changes one of them (ctime cannot be set back by a user)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [int(getattr(st, f)) for f in STAT_FIELDS]


def stats_of(entry: Path, names: Any) -> dict[str, list[int] | None]:
    return {n: file_stat(entry / n) for n in names}


def unchanged_since_hashed(entry: Path, manifest: dict[str, Any]) -> bool:
    """True when every listed file has the stat recorded when its sha256 last passed (at the save
    or at a later check, VERIFIED): hashing it again would read the same bytes. A file that was
    truncated, rewritten, replaced or copied has another stat, so it is hashed again."""
    files = manifest.get("files") or {}
    if not files:
        return False
    now = stats_of(entry, files)
    if any(v is None for v in now.values()):
        return False
    for record in (manifest.get("stat"), read_json_file(entry / VERIFIED)):
        if isinstance(record, dict) and all(record.get(n) == now[n] for n in files):
            return True
    return False


def record_verified(entry: Path, manifest: dict[str, Any]) -> None:
    """After a passing sha256: the files' stat now, so the next load can trust them (best effort)."""
    tmp = entry / f".{VERIFIED}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(stats_of(entry, manifest.get("files") or {})), encoding="utf-8")
        os.replace(tmp, entry / VERIFIED)
    except OSError:
        tmp.unlink(missing_ok=True)


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def entry_bytes(entry: Path) -> int:
    total = 0
    for p in entry.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


# ------------------------------------------------------------------------------ the cache


@dataclass
class Lookup:
    entry: Path
    key: str
    inputs: dict[str, Any]
    problem: str | None  # None: usable (quick checks passed; sha256 still to confirm)
    exists: bool


class QCache:
    """One cache root. `events` is the trainer's EventWriter (notice/timing events)."""

    def __init__(self, root: str | os.PathLike[str], writer: Any = None) -> None:
        self.root = Path(root).expanduser()
        self.writer = writer

    def _notice(self, message: str, **fields: Any) -> None:
        if self.writer is not None:
            self.writer.notice(message, **fields)

    def _timing(self, phase: str, seconds: float, **fields: Any) -> None:
        if self.writer is not None:
            self.writer.emit("timing", phase=phase, s=round(seconds, 3), **fields)

    def lookup(self, inputs: dict[str, Any]) -> Lookup:
        key = cache_key(inputs)
        entry = self.root / key
        if not entry.is_dir():
            return Lookup(entry, key, inputs, "no entry", False)
        return Lookup(entry, key, inputs, quick_problem(entry, inputs), True)

    def set_aside(self, entry: Path, why: str) -> None:
        """A bad entry is renamed, never loaded again, never silently reused."""
        dest = entry.with_name(f"{entry.name}.bad-{int(time.time())}")
        try:
            os.replace(entry, dest)
        except OSError as e:
            self._notice(f"weight cache: could not set aside {entry.name} ({e.strerror or e})")
            return
        self._notice(f"weight cache: set aside {entry.name} as {dest.name}: {why}")

    def save(self, model: Any, tokenizer: Any, inputs: dict[str, Any], source: str) -> Path | None:
        """Write ROOT/KEY atomically; None (and a notice) when it cannot. Never raises."""
        key = cache_key(inputs)
        final = self.root / key
        if (final / MANIFEST).is_file():
            return final
        t0 = time.perf_counter()
        tmp = self.root / f".tmp-{key}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), max_shard_size="2GB")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            _keep_original_config(tmp, source)
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            t_write = time.perf_counter() - t0
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as ex:
                digests = list(ex.map(lambda n: sha256_file(tmp / n), names))
            files = {n: {"size": (tmp / n).stat().st_size, "sha256": d}
                     for n, d in zip(names, digests, strict=True)}
            manifest = {"format": CACHE_FORMAT, "key": key, "inputs": inputs, "files": files,
                        "bytes": sum(f["size"] for f in files.values()), "created_at": time.time(),
                        "source": source,
                        # the files as hashed: a later load with the same stat skips the sha256
                        "stat": stats_of(tmp, names)}
            commit_entry(tmp, final, MANIFEST, manifest, names)
        except Exception as e:  # noqa: BLE001 - a failed save costs speed, never the run
            shutil.rmtree(tmp, ignore_errors=True)
            self._notice(f"weight cache: not saved ({type(e).__name__}: {str(e)[:200]}); "
                         "later attempts quantise again")
            return None
        dt = time.perf_counter() - t0
        self._timing("cache_save", dt, bytes=manifest["bytes"], write_s=round(t_write, 3))
        self._notice(f"weight cache: saved the quantised base model ({manifest['bytes'] / 1e9:.2f} GB) "
                     f"in {dt:.1f}s as {key}", cache_key=key, cache_bytes=manifest["bytes"],
                     cache_dir=str(final))
        return final


def commit_entry(tmp: Path, final: Path, manifest_name: str, manifest: dict[str, Any],
                 names: list[str]) -> None:
    """Make a cache entry visible: the manifest and every file fsynced, then tmp renamed to
    final. Another writer that got there first wins (its entry is as good): tmp is removed.
    Raises OSError otherwise. Both caches (weights here, runner/dcache.py) commit this way."""
    with open(tmp / manifest_name, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    for n in names:  # the data on disk before the rename makes the entry visible
        fd = os.open(tmp / n, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / manifest_name).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def _keep_original_config(folder: Path, source: str) -> None:
    """config.json = the source's own config + the quantization_config that save_pretrained wrote.
    A loader may edit the live config (Unsloth raises max_position_embeddings and sets RoPE
    scaling from max_seq_length): a cache must not carry one attempt's edits into the next."""
    orig = original_config(source)
    saved = folder / "config.json"
    if orig is None or not saved.is_file():
        return
    try:
        cfg = json.loads(orig.read_text(encoding="utf-8"))
        qc = json.loads(saved.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError):
        return
    if qc is None:
        return
    cfg["quantization_config"] = qc
    saved.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------ listing (CLI)


def shared_root() -> Path:
    """The cache shared between runs: $QLORA_WATCH_HOME/qcache (or the user state dir's)."""
    from supervisor.paths import state_home

    return state_home() / "qcache"


def list_entries(root: Path) -> list[dict[str, Any]]:
    """Every entry under root: key, bytes, model, created, state (ok | bad | partial)."""
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        m = read_manifest(p) or {}
        state = "ok" if m and ".bad-" not in p.name and not p.name.startswith(".tmp-") else (
            "bad" if ".bad-" in p.name else "partial")
        model = (m.get("inputs") or {}).get("model") or {}
        out.append({"key": p.name, "path": str(p), "bytes": entry_bytes(p), "state": state,
                    "model": model.get("repo") or model.get("path") or m.get("source") or "?",
                    "backend": (m.get("inputs") or {}).get("backend"),
                    "created_at": m.get("created_at")})
    return out


def total_bytes(root: Path) -> int:
    return sum(e["bytes"] for e in list_entries(root))


# ------------------------------------------------------------------------------ loading


def _free(model: Any) -> None:
    import gc

    del model
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_base_cached(backend: Any, recipe: Any, path: str, attn: str, writer: Any = None,
                     device: str = "cuda", root: str | None = None, *, load_base: Any) -> tuple[Any, Any]:
    """The quantised base model and tokenizer: from the cache when an entry for exactly these
    inputs passes every check, else from `path` (then saved to the cache when one is set).
    `load_base(backend, recipe, path, attn)` is backends.load_base (passed in: backends calls
    this module, not the other way round)."""

    def timing(phase: str, seconds: float, **fields: Any) -> None:
        if writer is not None:
            writer.emit("timing", phase=phase, s=round(seconds, 3), **fields)

    def notice(message: str, **fields: Any) -> None:
        if writer is not None:
            writer.notice(message, **fields)

    root = root if root is not None else os.environ.get(ENV_DIR)
    off = why_off(recipe)
    cache = QCache(root, writer) if root and off is None else None
    inputs = key_inputs(recipe, path, backend.name, device) if cache else None
    if cache is not None and inputs is not None:
        look = cache.lookup(inputs)
        if look.exists and look.problem is not None:
            notice(f"weight cache: entry {look.key} not used ({look.problem}); loading the "
                   "original weights", cache_fallback=look.problem)
            cache.set_aside(look.entry, look.problem)
        elif look.exists:
            got = _load_from_entry(backend, recipe, path, attn, look, cache, timing, notice, load_base)
            if got is not None:
                return got
    t0 = time.perf_counter()
    model, tokenizer = load_base(backend, recipe, path, attn)
    timing("model_load", time.perf_counter() - t0, source="original",
           quantise=bool(recipe.quant.load_in_4bit))
    if cache is not None:
        if inputs is None:  # a hub model downloaded just now: its snapshot is known now
            inputs = key_inputs(recipe, path, backend.name, device)
        if inputs is not None:
            cache.save(model, tokenizer, inputs, path)
    return model, tokenizer


def _load_from_entry(backend: Any, recipe: Any, path: str, attn: str, look: Lookup, cache: QCache,
                     timing: Any, notice: Any, load_base: Any) -> tuple[Any, Any] | None:
    """Load look.entry while its files are hashed beside the load; None (after a notice and
    setting the entry aside) when the hashes or the load fail: the caller loads the original."""
    manifest = read_manifest(look.entry) or {}
    t0 = time.perf_counter()
    trusted = os.environ.get(ENV_VERIFY) != "always" and unchanged_since_hashed(look.entry, manifest)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    hashing = pool.submit(lambda: ([], 0.0) if trusted else
                          (hash_problems(look.entry, manifest), time.perf_counter() - t0))
    model = None
    try:
        model, tokenizer = load_base(backend, recipe, str(look.entry), attn)
        t_load = time.perf_counter() - t0
        problems, t_hash = hashing.result()
    except Exception as e:  # noqa: BLE001 - a broken entry must cost a cold load, not the run
        pool.shutdown(wait=True)
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        if model is not None:
            _free(model)
        notice(f"weight cache: entry {look.key} failed to load ({why}); loading the original weights",
               cache_fallback=why)
        cache.set_aside(look.entry, why)
        return None
    pool.shutdown(wait=False)
    if problems:
        _free(model)
        notice(f"weight cache: entry {look.key} failed its sha256 check ({problems[0]}); loading "
               "the original weights", cache_fallback=problems[0])
        cache.set_aside(look.entry, problems[0])
        return None
    if not trusted:
        record_verified(look.entry, manifest)
    timing("model_load", t_load, source="cache", bytes=manifest.get("bytes"))
    timing("cache_verify", t_hash, bytes=manifest.get("bytes"), hashed=not trusted)
    how = ("files unchanged since their sha256 passed (size, mtime, ctime, inode)" if trusted
           else "sha256 checked")
    notice(f"weight cache: loaded the quantised base model from {look.key} "
           f"({(manifest.get('bytes') or 0) / 1e9:.2f} GB, {t_load:.1f}s; {how})",
           cache_key=look.key, cache_bytes=manifest.get("bytes"), cache_dir=str(look.entry))
    return model, tokenizer

"""The recipes that ship with qlora-watch: find one by name, list them, copy one to edit, and
the recipe's JSON Schema.

In a checkout they are `recipes/` at the repository root; a wheel carries the same files as
the package data `supervisor/recipes/` (pyproject maps one onto the other), so
`qlora-watch start recipes/tiny.toml` and `qlora-watch start tiny` work from either.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent / "recipes"  # a wheel: package data
CHECKOUT_DIR = Path(__file__).resolve().parents[1] / "recipes"  # a source checkout or -e install
# Cards to say "fits" against, smallest first (GiB as torch reports them).
CARDS_GIB = (16, 24, 48, 80, 140)


class CatalogError(Exception):
    """A recipe name or copy that cannot be used; the message is shown as is (exit 2)."""


def smallest_card(need: float, error: float) -> str:
    """'24 GiB card', or '24 GiB card (tight on 16)' when the card below is within preflight's
    error of the need (each card's total as nvidia-smi shows it: 24 = 24,564 MiB)."""
    from supervisor.preflight.emulation import card_total_bytes

    tight = None
    for c in CARDS_GIB:
        total = card_total_bytes(c)
        if need <= total * (1 - error):
            return f"{c} GiB card" + (f" (tight on {tight})" if tight else "")
        if need <= total * (1 + error):
            tight = c
    return f"{tight} GiB card, tight" if tight else f"no single card (>{max(CARDS_GIB)} GiB)"


def shipped_dir() -> Path:
    """The folder of shipped recipes: the package's data, else the checkout's `recipes/`."""
    for d in (PACKAGE_DIR, CHECKOUT_DIR):
        if (d / "tiny.toml").is_file():
            return d
    raise CatalogError("no shipped recipes found (a broken install? reinstall qlora-watch)")


def names() -> list[str]:
    """The shipped recipes' names (file stems), smallest model first: 8b before 14b, tiny last."""
    def key(stem: str) -> tuple[float, str]:
        m = re.match(r"\d+", stem)
        return (int(m.group()) if m else float("inf"), stem)

    return sorted((p.stem for p in shipped_dir().glob("*.toml")), key=key)


def find(name: str) -> Path:
    """The shipped recipe called `name` (`8b`, `8b.toml`), or CatalogError listing them."""
    stem = name.removesuffix(".toml")
    path = shipped_dir() / f"{stem}.toml"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", stem) or not path.is_file():
        raise CatalogError(f"no shipped recipe {name!r}; there are: {', '.join(names())}")
    return path


def resolve(arg: str) -> str:
    """A recipe argument as a file path: the file if it exists; else `NAME` or `recipes/NAME.toml`
    (the README's spelling, outside a checkout) as the shipped recipe of that name."""
    p = Path(arg).expanduser()
    if p.exists():
        return arg
    shorthand = re.fullmatch(r"(?:\./)?recipes/([A-Za-z0-9_.-]+)\.toml", arg)
    if shorthand or re.fullmatch(r"[A-Za-z0-9_-]+(\.toml)?", arg):
        try:
            return str(find(shorthand.group(1) if shorthand else arg))
        except CatalogError:
            return arg  # load_recipe then says "no such recipe file" for what was typed
    return arg


@dataclass
class Entry:
    """One line of `qlora-watch recipes`."""

    name: str
    model: str
    seq: int
    batch: str
    need_gib: float | None
    fits: str

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def entry(path: Path) -> Entry:
    """Name, model, seq, batch and the smallest card it fits (from the preflight estimate)."""
    from supervisor.preflight.check import estimate
    from supervisor.recipe import load_recipe

    r = load_recipe(path)
    t = r.train
    model = "tiny random Llama (built locally)" if r.model.tiny else r.model.name
    need: float | None = None
    fits = "CPU or any GPU" if r.model.tiny else "?"
    try:
        report = estimate(r, gpu_mem_gib=max(CARDS_GIB), host_ram_gib=1 << 20, disk_free_gib=1 << 20)
        need = report.vram.need / 2**30
        if not r.model.tiny:
            fits = smallest_card(report.vram.need, report.calibration.estimate_error)
            if r.hardware.gpus > 1:
                fits += f" x {r.hardware.gpus}"
    except Exception as e:  # noqa: BLE001 - one odd recipe must not hide the others
        fits = f"? ({type(e).__name__})"
    return Entry(path.stem, model, t.max_seq_len, f"{t.per_device_batch} x {t.grad_accum}",
                 None if need is None else round(need, 1), fits)


def render(entries: list[Entry]) -> str:
    rows = [("NAME", "MODEL", "SEQ", "BATCH", "VRAM", "FITS")]
    for e in entries:
        vram = "-" if e.need_gib is None else f"{e.need_gib:.1f} GiB"
        rows.append((e.name, e.model, str(e.seq), e.batch, vram, e.fits))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + ("\n\nqlora-watch recipes cp NAME FILE copies one to edit; "
                               "qlora-watch start NAME runs it as shipped")


def copy(name: str, dest: str, force: bool = False) -> Path:
    """Copy a shipped recipe to `dest` to edit. A data.path that points at shipped data becomes
    absolute, so the copy still finds its data wherever it is put."""
    src = find(name)
    out = Path(dest).expanduser()
    if out.is_dir():
        out = out / src.name
    if out.exists() and not force:
        raise CatalogError(f"{out} exists; pass --force to overwrite it")
    text = src.read_text(encoding="utf-8")

    def absolute(m: re.Match[str]) -> str:
        data = (src.parent / m.group(2)).resolve()
        return f'{m.group(1)}"{data}"' if data.is_file() else m.group(0)

    text = re.sub(r'(?m)^(path\s*=\s*)"([^"/][^"]*)"', absolute, text, count=1)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise CatalogError(f"cannot write {out}: {e.strerror}") from None
    return out


def schema() -> dict[str, Any]:
    """The recipe's JSON Schema, from the pydantic model (for editors: taplo, Even Better TOML)."""
    from supervisor.recipe import Recipe

    out = Recipe.model_json_schema()
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out.setdefault("title", "qlora-watch recipe")
    return out


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"

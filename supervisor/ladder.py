"""The OOM ladder: which rung a run is at, what that rung changes, what runs there, what is next.

One numbering, everywhere (preflight, `status`, events, the dashboard header, the report,
state.json and run.json (the store renumbers older files), the trainer's QLW_RUNG): rung None is the recipe as written ("base"); rung n >= 1
is the recipe with oom_ladder[0..n-1] applied in order, cumulatively (rung 2 of the default
ladder is seq 768 *and* r 8). Rung 1 is the first change, as preflight says it.

`recipe.apply_rung` stays the primitive (a copy with some keys changed, keeping the effective
batch; preflight uses it for batch changes too); this module owns what a *rung* means. Pure,
and stdlib at import: the recipe module (pydantic) is imported by the functions that apply or
read a rung, so the guards can number rungs without importing pydantic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervisor.recipe import Recipe, Rung


def label(rung: int | None, base: str = "base") -> str:
    """'rung N', or `base` before any change; what every screen prints ('the recipe as
    written' reads better inside a sentence)."""
    return base if rung is None else f"rung {rung}"


def changes(recipe: Recipe, rung: int | None) -> list[Rung]:
    """The ladder entries applied at `rung`, in order (oom_ladder[0..rung-1])."""
    return [] if rung is None else list(recipe.oom_ladder[:rung])


def change(recipe: Recipe, rung: int) -> Rung:
    """The one entry that rung `rung` adds to the rung before it."""
    return recipe.oom_ladder[rung - 1]


def effective(recipe: Recipe, rung: int | None) -> Recipe:
    """What runs at `rung`: the recipe with every change up to it applied (None: as written)."""
    from supervisor.recipe import apply_rung

    out = recipe
    for c in changes(recipe, rung):
        out = apply_rung(out, c)
    return out


def previous(rung: int | None) -> int | None:
    """The rung below: rung 1's is the base (None)."""
    return None if rung is None or rung <= 1 else rung - 1


def next_rung(recipe: Recipe, rung: int | None) -> int | None:
    """The rung after `rung`, or None when the ladder has no more (minimum settings)."""
    nxt = 1 if rung is None else rung + 1
    return nxt if nxt <= len(recipe.oom_ladder) else None


def describe_change(recipe: Recipe, entry: Rung) -> str:
    """'max_seq_len 1024 -> 768' for one ladder entry applied to `recipe` (header, events)."""
    parts = []
    data = recipe.model_dump(mode="python")
    from supervisor.recipe import _flatten

    for key, value in _flatten(entry).items():
        cur: Any = data
        for p in key.split("."):
            cur = cur.get(p) if isinstance(cur, dict) else None
        short = key.split(".")[-1]
        parts.append(f"{short} {_fmt(cur)} -> {_fmt(value)}")
    return ", ".join(parts)


def describe(recipe: Recipe, rung: int) -> str:
    """What rung `rung` changes from the rung below it: 'max_seq_len 1024 -> 768'."""
    return describe_change(effective(recipe, previous(rung)), change(recipe, rung))


def changes_adapter_shape(entry: Rung) -> bool:
    """Rank or target changes make old checkpoints unloadable (size mismatch)."""
    from supervisor.recipe import _flatten

    keys = set(_flatten(entry))
    return bool(keys & {"lora.r", "lora.target_modules"})


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)

"""How one attempt's effective settings reach the trainer (docs/trainer-protocol.md).

Three ways, for any trainer: `QLW_*` environment variables, `{name}` placeholders in the
command, and for an axolotl YAML config named in the command a rewritten copy per attempt.
A foreign trainer (`qlora-watch run`) gets only the settings that were given (`--set`, the
recipe, the axolotl config) or that a ladder rung changed: qlora-watch does not know its
script's defaults, so it never invents a sequence length the script did not ask for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.recipe import Recipe, Rung, _flatten

# name (placeholder and env suffix) -> recipe key
SETTINGS: dict[str, str] = {
    "max_seq_len": "train.max_seq_len",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "target_modules": "lora.target_modules",
    "per_device_batch": "train.per_device_batch",
    "grad_accum": "train.grad_accum",
}
ENV = {name: f"QLW_{name.upper()}" for name in SETTINGS}
# Per attempt, always known: where to resume from, which attempt, which ladder rung.
RUNTIME = ("resume_from", "attempt", "rung", "output_dir")
PLACEHOLDER = re.compile(r"\{(" + "|".join([*SETTINGS, *RUNTIME]) + r")\}")

# axolotl's config keys (docs: "Config Reference"), per recipe key
AXOLOTL_KEYS: dict[str, str] = {
    "train.max_seq_len": "sequence_len",
    "lora.r": "lora_r",
    "lora.alpha": "lora_alpha",
    "lora.target_modules": "lora_target_modules",
    "train.per_device_batch": "micro_batch_size",
    "train.grad_accum": "gradient_accumulation_steps",
}
AXOLOTL_MARKERS = ("base_model", "datasets", "adapter", "sequence_len", "micro_batch_size")


class HandoffError(Exception):
    """A command that asks for a setting qlora-watch has no value for."""


@dataclass
class Handoff:
    """What one attempt is launched with."""

    argv: list[str]
    env: dict[str, str]
    rewritten: list[Path] = field(default_factory=list)  # axolotl copies written for it


def value_of(recipe: Recipe, key: str) -> Any:
    cur: Any = recipe.model_dump(mode="python")
    for part in key.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def _text(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def known_keys(recipe: Recipe, rungs: list[Rung]) -> set[str]:
    """The recipe keys with a value the trainer should get: all of them for a recipe with a
    model (the built-in trainer or a script reading $QLW_RECIPE), else those given or changed."""
    if not recipe.foreign:
        return set(SETTINGS.values())
    keys = set(recipe.trainer.given or [])
    for rung in rungs:
        keys |= set(_flatten(rung))
        if "train.per_device_batch" in _flatten(rung):
            keys.add("train.grad_accum")  # apply_rung keeps the effective batch
    return keys & set(SETTINGS.values())


def settings(recipe: Recipe, keys: set[str], resume: str | None, attempt: int,
             rung: int | None, output_dir: Path) -> dict[str, str]:
    """name -> text for every placeholder this attempt can fill."""
    out = {name: _text(value_of(recipe, key)) for name, key in SETTINGS.items() if key in keys}
    out.update(resume_from=resume or "", attempt=str(attempt),
               rung="0" if rung is None else str(rung), output_dir=str(output_dir))  # ladder.py numbering
    return out


def env_for(values: dict[str, str]) -> dict[str, str]:
    """QLW_MAX_SEQ_LEN=768 ... QLW_RESUME_FROM, QLW_ATTEMPT, QLW_RUNG (rung 0: as written)."""
    env = {ENV[name]: v for name, v in values.items() if name in ENV}
    env.update(QLW_RESUME_FROM=values["resume_from"], QLW_ATTEMPT=values["attempt"],
               QLW_RUNG=values["rung"])
    return env


def placeholders(argv: list[str]) -> set[str]:
    return {m.group(1) for a in argv for m in PLACEHOLDER.finditer(a)}


def fill(argv: list[str], values: dict[str, str]) -> list[str]:
    """Replace {max_seq_len}-style placeholders; a setting with no value is a HandoffError."""
    missing = sorted(placeholders(argv) - set(values))
    if missing:
        hint = ", ".join(f"--set {SETTINGS[n]}=..." for n in missing if n in SETTINGS)
        raise HandoffError(f"the command uses {', '.join('{' + n + '}' for n in missing)} but "
                           f"qlora-watch has no value for it: pass {hint}")
    return [PLACEHOLDER.sub(lambda m: values[m.group(1)], a) for a in argv]


# ------------------------------------------------------------------------------ axolotl


def _load_yaml(path: Path) -> dict[str, Any] | None:
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - not YAML, unreadable, PyYAML missing: not an axolotl config
        return None
    return data if isinstance(data, dict) else None


def axolotl_config(argv: list[str], cwd: Path) -> tuple[int, Path, dict[str, Any]] | None:
    """(argv index, path, parsed) of the first .yml/.yaml argument that reads as axolotl's."""
    for i, a in enumerate(argv):
        if not a.endswith((".yml", ".yaml")):
            continue
        p = Path(a) if Path(a).is_absolute() else cwd / a
        data = _load_yaml(p) if p.is_file() else None
        if data is not None and any(k in data for k in AXOLOTL_MARKERS):
            return i, p, data
    return None


def axolotl_given(config: dict[str, Any]) -> list[str]:
    """`--set` items for the settings an axolotl config states (its values are the base)."""
    out = []
    for key, ax in AXOLOTL_KEYS.items():
        v = config.get(ax)
        if v is None:
            continue
        if isinstance(v, list):
            out.append(f"{key}=[{', '.join(repr(str(x)) for x in v)}]")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"{key}={v}")
    if config.get("lora_target_linear") is True and config.get("lora_target_modules") is None:
        out.append('lora.target_modules="all-linear"')
    return out


def rewrite_axolotl(config: dict[str, Any], recipe: Recipe, keys: set[str], resume: str | None,
                    output_dir: Path) -> dict[str, Any]:
    """The config with this attempt's settings: rung values, resume_from_checkpoint, output_dir."""
    out = dict(config)
    for key, ax in AXOLOTL_KEYS.items():
        if key not in keys:
            continue
        v = value_of(recipe, key)
        if key == "lora.target_modules":
            if v == "all-linear":
                out["lora_target_linear"] = True
                out.pop("lora_target_modules", None)
                continue
            out["lora_target_linear"] = False
        out[ax] = v
    out["resume_from_checkpoint"] = resume
    out["output_dir"] = str(output_dir)  # checkpoints where qlora-watch watches and prunes
    return out


def prepare(recipe: Recipe, argv: list[str], *, rungs: list[Rung], resume: str | None,
            attempt: int, rung: int | None, output_dir: Path, cwd: Path,
            attempt_dir: Path) -> Handoff:
    """The argv and env of one attempt; an axolotl config is rewritten into attempt_dir."""
    keys = known_keys(recipe, rungs)
    values = settings(recipe, keys, resume, attempt, rung, output_dir)
    out_argv = fill(argv, values)
    rewritten: list[Path] = []
    found = axolotl_config(out_argv, cwd)
    if found is not None:
        import yaml

        i, path, config = found
        copy = attempt_dir / f"axolotl-{path.name}"
        copy.write_text(yaml.safe_dump(rewrite_axolotl(config, recipe, keys, resume, output_dir),
                                       sort_keys=False), encoding="utf-8")
        out_argv[i] = str(copy)
        rewritten.append(copy)
    return Handoff(argv=out_argv, env=env_for(values), rewritten=rewritten)


# ------------------------------------------------------------------------------ reach


def _script_reads_env(argv: list[str], cwd: Path) -> bool:
    """The command's Python script mentions QLW_ (reads the env vars) or our settings helper."""
    for a in argv:
        if not a.endswith(".py"):
            continue
        p = Path(a) if Path(a).is_absolute() else cwd / a
        try:
            text = p.read_text(encoding="utf-8", errors="replace")[:2_000_000]
        except OSError:
            continue
        if "QLW_" in text or "effective_settings" in text:
            return True
    return False


def ladder_reaches(recipe: Recipe, cwd: Path) -> str | None:
    """How a ladder rung reaches the trainer ('env', 'placeholder', 'axolotl', 'recipe'), or
    None when the command reads none of them (a relaunch after an OOM would change nothing)."""
    argv = recipe.trainer.command
    if not argv:
        return "recipe"  # the built-in trainer reads the resolved recipe
    if not recipe.foreign:
        return "recipe"  # a script given [model]/[data] is documented to read $QLW_RECIPE
    if placeholders(argv) & set(SETTINGS):
        return "placeholder"
    if axolotl_config(argv, cwd) is not None:
        return "axolotl"
    if _script_reads_env(argv, cwd):
        return "env"
    return None

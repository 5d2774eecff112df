"""Recipes: TOML files validated strictly, with typed `--set key=value` overrides.

Unknown keys anywhere are errors naming the key path and a close match; malformed TOML
and invalid UTF-8 give `file:line:col`. Every error is a `RecipeError` (exit code 2).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of TOML; 1 MiB is already absurd

SECRET_ENV_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|_KEY)$", re.IGNORECASE)


class RecipeError(Exception):
    """A recipe (or an override) that cannot be used. The message is shown as is; exit 2."""

    exit_code = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=False)


# ---------------------------------------------------------------------------- sections


class TinyModel(_Strict):
    """A tiny Llama built locally from a config with random weights (no downloads)."""

    hidden_size: int = Field(64, ge=8, le=4096)
    num_layers: int = Field(2, ge=1, le=64)
    num_heads: int = Field(4, ge=1, le=64)
    num_kv_heads: int = Field(2, ge=1, le=64)
    intermediate_size: int = Field(128, ge=8, le=16384)
    vocab_size: int = Field(512, ge=64, le=65536, description="tokenizer vocabulary to train")
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModel":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self


class ModelSection(_Strict):
    name: str = Field(..., min_length=1, description="Hub id or local folder")
    shape: str | None = Field(
        None, description="built-in shape for preflight when no local config.json, e.g. llama-3.1-8b"
    )
    attn_implementation: Literal[
        "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "varlen"
    ] = Field("sdpa", description="varlen: padding-free batches on PyTorch's own varlen flash kernel "
                                  "(HF path; no flash-attn needed)")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    trust_remote_code: bool = False
    tiny: TinyModel | None = None
    backend: Literal["hf", "unsloth", "auto"] = Field(
        "hf", description="auto: Unsloth where it imports and supports the model, else transformers + peft"
    )
    weight_cache: Literal["run", "shared", "off"] = Field(
        "run", description="quantised-weight cache for relaunches: the run's own (removed with it), "
        "shared between runs (`qlora-watch cache ls/rm`), or off",
    )


class QuantSection(_Strict):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class LoraSection(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("target_modules must name at least one module")
            for name in v:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
                    raise ValueError(f"not a module name: {name!r}")
        return v


class DataSection(_Strict):
    path: str = Field(..., min_length=1, description="JSONL file; relative paths are from the recipe")
    format: Literal["auto", "messages", "text", "prompt_completion"] = "auto"
    max_samples: int | None = Field(None, ge=1)
    eval_fraction: float = Field(0.0, ge=0.0, lt=0.5)
    cache: bool = Field(True, description="built-in trainer: keep the tokenised records in the run's "
                        "dcache/ so that relaunches and resumes skip tokenising (runner/dcache.py)")


class TrainSection(_Strict):
    output_dir: str = Field(..., min_length=1)
    max_seq_len: int = Field(2048, ge=8, le=1 << 20)
    per_device_batch: int = Field(1, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=65536)
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    optim: Literal[
        "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused"
    ] = "paged_adamw_8bit"
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    num_epochs: float = Field(1.0, gt=0.0, le=1000.0)
    max_steps: int = Field(-1, ge=-1, description="-1: run num_epochs")
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(3, ge=1, le=1000, description="enforced by qlora-watch, not the trainer")
    logging_steps: int = Field(5, ge=1)
    bf16: bool = True
    gradient_checkpointing: bool = True
    seed: int = 42
    packing: bool = False
    shuffle: bool = Field(True, description="false: train on samples in file order")
    padding_free: bool = False
    use_liger_kernel: bool = False
    use_cpu: Literal["auto", True, False] = "auto"
    dataloader_workers: int = Field(0, ge=0, le=64)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="trackers ([] for none); every attempt of a run continues one tracker run",
    )

    @field_validator("output_dir")
    @classmethod
    def _safe_output_dir(cls, v: str) -> str:
        parts = Path(v).parts
        if ".." in parts:
            raise ValueError("must not contain '..'")
        if Path(v).expanduser().resolve() in (Path("/"), Path.home().resolve()):
            raise ValueError("must not be / or your home folder (checkpoints are pruned in it)")
        return v

    @field_validator("max_steps")
    @classmethod
    def _some_steps(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 trains nothing: give a positive number, or -1 to run num_epochs")
        return v

    @model_validator(mode="after")
    def _padding_free_needs_packing(self) -> TrainSection:
        # trl refuses padding_free without packing when max_length is set (it could not truncate);
        # packing (best-fit decreasing) is itself padding-free: say so before the GPU is touched.
        if self.padding_free and not self.packing:
            raise ValueError("padding_free = true needs packing = true (trl's best-fit packing is the "
                             "padding-free mode that still enforces max_seq_len)")
        return self

    @property
    def effective_batch(self) -> int:
        return self.per_device_batch * self.grad_accum


class HardwareSection(_Strict):
    emulate_vram_gib: float | None = Field(
        None, gt=0.0, le=4096,
        description="rehearse a smaller card: its total as nvidia-smi shows it (24: 24,564 MiB)",
    )
    # ballast (default): a helper holds the rest of the GPU, so the context and the allocator
    # share the card's total as on the real card. fraction: only the allocator is capped (card
    # minus the context measured at start); for a GPU other processes also use.
    emulate_mode: Literal["ballast", "fraction"] = Field(
        "ballast", description="how to rehearse: ballast (faithful) or fraction (allocator cap)"
    )
    gpus: int = Field(1, ge=1, le=64, description=">1: FSDP-QLoRA through accelerate launch")
    nodes: int = Field(1, ge=1, le=1024, description=">1: several Slurm nodes (qlora-watch submit): "
                       "srun + accelerate launch, hardware.gpus per node")
    fsdp_cpu_offload: bool = Field(True, description="with gpus > 1: offload shards to host RAM")
    gpu_mem_gib: float | None = Field(None, gt=0.0, description="preflight: assume this card size")
    host_ram_gib: float | None = Field(None, gt=0.0, description="preflight: assume this much RAM")


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")


class TrainerSection(_Strict):
    """How the trainer is launched. Default: the built-in trainer.

    With `command` and no [model]/[data], the recipe describes a foreign trainer (any training
    command, `qlora-watch run`): qlora-watch supervises it and hands it the ladder's settings
    (docs/trainer-protocol.md) but knows nothing of its model or data.
    """

    command: list[str] | None = Field(
        None, description="argv list of your own script (never a shell string)"
    )
    output_dir: str | None = Field(
        None, description="a foreign trainer's output folder (the same as train.output_dir)"
    )
    save_total_limit: int | None = Field(
        None, ge=1, le=1000, description="the same as train.save_total_limit"
    )
    stop_signal: Literal[STOP_SIGNALS] = Field(  # type: ignore[valid-type]
        "SIGTERM", description="what a graceful stop sends (SIGINT: scripts that save on Ctrl-C)"
    )
    oom_relaunch_unchanged: bool = Field(
        False, description="relaunch a trainer that reads no ladder setting, unchanged, after an OOM"
    )
    given: list[str] | None = Field(
        None, description="filled in by qlora-watch: the [train]/[lora] keys the recipe set"
    )

    @field_validator("command", mode="before")
    @classmethod
    def _argv_only(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError(
                "must be an argv list such as [\"python\", \"train.py\"], not a shell string"
            )
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v


class ThermalGuard(_Strict):
    enabled: bool = True
    margin_c: float = Field(5.0, ge=0.0, le=50.0, description="warn under this thermal margin")
    hotspot_c: float = Field(100.0, ge=40.0, le=130.0)


class OomGuard(_Strict):
    enabled: bool = True
    release_timeout_s: float = Field(60.0, gt=0.0)
    release_tolerance_mib: float = Field(1024.0, ge=0.0)


class CrashGuard(_Strict):
    enabled: bool = True
    max_restarts: int = Field(3, ge=0, le=100, description="crash-loop limit without progress")
    backoff_base_s: float = Field(10.0, gt=0.0)
    backoff_max_s: float = Field(600.0, gt=0.0)


class CheckpointGuard(_Strict):
    enabled: bool = True
    keep_best: bool = True
    disk_headroom_factor: float = Field(2.0, ge=1.0, le=100.0)
    min_free_gib: float = Field(1.0, ge=0.0)


class HostRamGuard(_Strict):
    enabled: bool = True
    min_available_gib: float = Field(4.0, ge=0.0)
    swap_growth_mib: float = Field(512.0, ge=0.0)


class UtilisationGuard(_Strict):
    enabled: bool = True
    threshold_pct: float = Field(90.0, ge=0.0, le=100.0)
    window_s: float = Field(300.0, gt=0.0)


class DivergenceGuard(_Strict):
    enabled: bool = True
    nan_consecutive: int = Field(3, ge=1)
    spike_factor: float = Field(4.0, gt=1.0, description="loss above factor x recent median")
    spike_window: int = Field(20, ge=3)


class StallGuard(_Strict):
    enabled: bool = True
    step_factor: float = Field(10.0, ge=1.0)
    floor_s: float = Field(600.0, gt=0.0)
    loading_s: float = Field(3600.0, gt=0.0)
    saving_s: float = Field(1800.0, gt=0.0)


class Guards(_Strict):
    thermal: ThermalGuard = ThermalGuard()
    oom: OomGuard = OomGuard()
    crash: CrashGuard = CrashGuard()
    checkpoints: CheckpointGuard = CheckpointGuard()
    host_ram: HostRamGuard = HostRamGuard()
    utilisation: UtilisationGuard = UtilisationGuard()
    divergence: DivergenceGuard = DivergenceGuard()
    stall: StallGuard = StallGuard()


class SupervisorSection(_Strict):
    sample_interval_s: float = Field(1.0, ge=0.05, le=3600.0)
    stop_grace_s: float = Field(120.0, gt=0.0, description="SIGTERM -> SIGKILL grace for a save")
    log_max_bytes: int = Field(50 * 1024 * 1024, ge=4096)
    log_backups: int = Field(3, ge=0, le=100)
    warm_standby: bool = Field(
        True, description="keep one trainer process with its imports done (no CUDA) for the next attempt",
    )


class NotifySection(_Strict):
    urls: list[str] = Field(default_factory=list, description="apprise URLs")
    on: list[Literal["warning", "error", "completed", "failed", "relaunch"]] = Field(
        default_factory=lambda: ["error", "completed", "failed", "relaunch"]
    )


class DebugSection(_Strict):
    """Test-only knobs. They change nothing unless set.

    raise_oom_above_seq_len: when train.max_seq_len is above it, the built-in trainer raises a real
    `torch.OutOfMemoryError("CUDA out of memory. ...")` at the start of the first optimizer step
    taken once global_step >= max(1, min(2 * save_steps, max_steps - 1)), so the checkpoints at
    save_steps and 2 * save_steps exist first. It is not caught: traceback, last stderr line
    `torch.OutOfMemoryError: CUDA out of memory. ...`, exit 1, as a real CUDA OOM. A run resumed
    at or past that step with the same max_seq_len fails at its first step.
    """

    raise_oom_above_seq_len: int | None = Field(
        None, ge=1, description="raise torch.OutOfMemoryError when max_seq_len is above this"
    )
    step_sleep_s: float = Field(0.0, ge=0.0, le=60.0, description="sleep in each step (tests)")


Rung = dict[str, Any]

DEFAULT_LADDER: list[Rung] = [
    {"train.max_seq_len": 768},
    {"lora.r": 8},
    {"lora.target_modules": ["q_proj", "v_proj"]},
]


class Recipe(_Strict):
    name: str = Field("run", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: ModelSection | None = None  # None: a foreign trainer ([trainer] command only)
    quant: QuantSection = QuantSection()
    lora: LoraSection = LoraSection()
    data: DataSection | None = None
    train: TrainSection
    env: dict[str, str] = Field(default_factory=dict)
    hardware: HardwareSection = HardwareSection()
    trainer: TrainerSection = TrainerSection()
    guards: Guards = Guards()
    supervisor: SupervisorSection = SupervisorSection()
    notify: NotifySection = NotifySection()
    oom_ladder: list[Rung] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_LADDER))
    debug: DebugSection = DebugSection()

    @model_validator(mode="before")
    @classmethod
    def _foreign_trainer(cls, data: Any) -> Any:
        """A [trainer]-only recipe: [trainer] output_dir/save_total_limit fill [train]."""
        if not isinstance(data, dict):
            return data
        tr = data.get("trainer")
        if not isinstance(tr, dict) or not tr.get("command") or ("model" in data and "data" in data):
            return data
        train = data.get("train")
        train = dict(train) if isinstance(train, dict) else {}
        for key in ("output_dir", "save_total_limit"):
            if tr.get(key) is not None:
                train.setdefault(key, tr[key])
        if tr.get("given") is None:  # the first validation: remember what was set by the user
            set_keys = [f"train.{k}" for k in train if k not in ("output_dir", "save_total_limit")]
            lora = data.get("lora")
            set_keys += [f"lora.{k}" for k in (lora if isinstance(lora, dict) else {})]
            data = {**data, "trainer": {**tr, "given": sorted(set_keys)}}
        return {**data, "train": train}

    @model_validator(mode="after")
    def _model_and_data_or_command(self) -> "Recipe":
        if (self.model is None or self.data is None) and not self.trainer.command:
            missing = "model" if self.model is None else "data"
            raise ValueError(f"[{missing}] is required (or give [trainer] command to supervise "
                             "your own training command)")
        return self

    @property
    def foreign(self) -> bool:
        """A training command qlora-watch knows nothing about (no [model]/[data])."""
        return self.model is None or self.data is None

    @field_validator("env")
    @classmethod
    def _no_literal_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"not an environment variable name: {key!r}")
            if SECRET_ENV_RE.search(key):
                raise ValueError(
                    f"{key}: do not put secrets in a recipe (it is copied into the run folder); "
                    "export it in your shell or use HF_TOKEN_PATH"
                )
        return v

    @model_validator(mode="after")
    def _backend_fits(self) -> "Recipe":
        # Said before any GPU work: Unsloth's path here is the built-in trainer on one GPU.
        if self.model is not None and self.model.backend == "unsloth":
            if self.hardware.gpus > 1:
                raise ValueError('model.backend = "unsloth" trains on one GPU; FSDP (hardware.gpus > 1) '
                                 'needs backend "hf" or "auto"')
            if self.trainer.command:
                raise ValueError('model.backend applies to the built-in trainer; trainer.command runs '
                                 'your own script (load Unsloth there)')
            if self.quant.load_in_4bit and self.quant.quant_type != "nf4":
                raise ValueError('model.backend = "unsloth" loads NF4 only (quant.quant_type = "nf4")')
        return self

    @field_validator("oom_ladder", mode="before")
    @classmethod
    def _flatten_rungs(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        return [_flatten(r) if isinstance(r, dict) else r for r in v]


# ---------------------------------------------------------------------------- loading


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"max_seq_len": 768}} -> {"train.max_seq_len": 768}; leaves lists alone."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _suggest(model: type[BaseModel] | None, loc: tuple[Any, ...], key: str) -> str:
    """'did you mean X?' from the fields of the model that holds `key`."""
    names: list[str] = []
    cur: Any = model
    for part in loc[:-1]:
        if cur is None or not isinstance(cur, type) or not issubclass(cur, BaseModel):
            cur = None
            break
        field = cur.model_fields.get(str(part))
        if field is None:
            cur = None
            break
        ann = field.annotation
        cur = _base_model_in(ann)
    if cur is not None and isinstance(cur, type) and issubclass(cur, BaseModel):
        names = list(cur.model_fields)
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _base_model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _base_model_in(arg)
        if found is not None:
            return found
    return None


def _line_of(text: str | None, loc: tuple[Any, ...]) -> str:
    """Best-effort ':line' for a key path, so errors point into the file."""
    if not text or not loc:
        return ""
    keys = [str(p) for p in loc if not isinstance(p, int)]
    if not keys:
        return ""
    last = keys[-1]
    section = ".".join(keys[:-1])
    current = ""
    pat = re.compile(rf"^\s*(\"?{re.escape(last)}\"?)\s*=")
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*\[+\s*([^\]]+?)\s*\]+", line)
        if m:
            current = m.group(1)
            continue
        hit = pat.match(line)
        if hit and current == section:
            return f":{i}:{hit.start(1) + 1}"
        dotted = re.match(rf"^\s*{re.escape(section + '.' + last)}\s*=", line) if section else None
        if dotted and current == "":
            return f":{i}:1"
    return ""


def format_validation_error(err: ValidationError, source: str, text: str | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e.get("loc", ()))
        path = ".".join(str(p) for p in loc) or "(recipe)"
        where = f"{source}{_line_of(text, loc)}"
        if e.get("type") == "extra_forbidden":
            key = str(loc[-1]) if loc else ""
            lines.append(f"{where}: {path}: unknown key{_suggest(Recipe, loc, key)}")
        elif e.get("type") == "missing":
            lines.append(f"{where}: {path}: required key is missing")
        else:
            msg = e.get("msg", "invalid value")
            msg = msg.removeprefix("Value error, ")
            got = f" (got {e.get('input')!r})" if loc else ""  # not the whole recipe back
            lines.append(f"{where}: {path}: {msg}{got}")
    return "\n".join(lines)


def parse_toml_text(text_bytes: bytes, source: str) -> tuple[dict[str, Any], str]:
    if len(text_bytes) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: recipe is {len(text_bytes)} bytes; the limit is {MAX_RECIPE_BYTES}")
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        line = text_bytes[: e.start].count(b"\n") + 1
        col = e.start - (text_bytes.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError(f"{source}:{line}:{col}: not valid UTF-8 (byte 0x{text_bytes[e.start]:02x})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if m:
            msg = msg[: m.start()].strip()
            raise RecipeError(f"{source}:{m.group(1)}:{m.group(2)}: invalid TOML: {msg}") from None
        line = text.count("\n") + 1
        raise RecipeError(f"{source}:{line}:1: invalid TOML: {msg}") from None
    return data, text


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.max_seq_len=768' -> (["train", "max_seq_len"], 768). Values are TOML values;
    a bare word that is not valid TOML is taken as a string."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_seq_len=768")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise RecipeError(f"--set {item!r}: {key!r} is not a key path such as train.max_seq_len")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    cur = data
    for part in path[:-1]:
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {'.'.join(path)}: {part} is not a section")
        cur = nxt
    cur[path[-1]] = value


def apply_overrides(data: dict[str, Any], items: list[str]) -> None:
    """Apply `--set KEY=VALUE` items to a recipe's raw dict, in order (parse_override each)."""
    for item in items:
        apply_override(data, *parse_override(item))


def validate(data: dict[str, Any], source: str = "<recipe>", text: str | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source, text)) from None
    # Each ladder rung must name real keys and produce a valid recipe.
    for i, rung in enumerate(recipe.oom_ladder):
        try:
            apply_rung(recipe, rung)
        except RecipeError as e:
            raise RecipeError(f"{source}: oom_ladder[{i}]: {e}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, parse, override and validate a recipe file. Raises RecipeError."""
    p = Path(path)
    source = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{source}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{source}: is a folder, not a recipe file") from None
    except OSError as e:
        raise RecipeError(f"{source}: cannot read: {e.strerror}") from None
    data, text = parse_toml_text(raw, source)
    apply_overrides(data, overrides or [])
    recipe = validate(data, source, text)
    return resolve_paths(recipe, p.resolve().parent)


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make data.path absolute relative to the recipe file (output_dir stays relative to cwd)."""
    if recipe.data is None:
        return recipe
    data_path = Path(recipe.data.path).expanduser()
    if not data_path.is_absolute():
        data_path = (base / data_path).resolve()
    r = recipe.model_copy(deep=True)
    r.data.path = str(data_path)
    return r


def apply_rung(recipe: Recipe, rung: Rung) -> Recipe:
    """A copy of `recipe` with one OOM-ladder rung applied, validated.

    Keeps the effective batch: when a rung lowers per_device_batch and does not set
    grad_accum, grad_accum grows so that batch x accum is unchanged.
    """
    data = recipe.model_dump(mode="python")
    effective = recipe.train.effective_batch
    for key, value in _flatten(rung).items():
        apply_override(data, key.split("."), value)
    if "train.per_device_batch" in rung and "train.grad_accum" not in rung:
        batch = rung["train.per_device_batch"]
        if not isinstance(batch, int) or isinstance(batch, bool):
            raise RecipeError(f"train.per_device_batch: must be an integer (got {batch!r})")
        if batch <= 0 or effective % batch:
            raise RecipeError(
                f"per_device_batch {batch} does not divide the effective batch {effective}"
            )
        data["train"]["grad_accum"] = effective // batch
    data["oom_ladder"] = []
    try:
        out = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, "ladder rung")) from None
    out.oom_ladder = recipe.oom_ladder
    return out


def apply_sets(recipe: Recipe, items: list[str], source: str = "--set") -> Recipe:
    """A copy of a validated recipe with `--set KEY=VALUE` items applied and validated again
    (`resume --set`); for a foreign trainer the keys join trainer.given (it gets them)."""
    if not items:
        return recipe
    data = recipe.model_dump(mode="python")
    apply_overrides(data, items)
    if recipe.foreign:
        keys = {parse_override(i)[0] for i in items}
        given = set(data["trainer"].get("given") or [])
        given |= {".".join(k) for k in keys if k[0] in ("train", "lora")}
        data["trainer"]["given"] = sorted(given)
    return validate(data, source)


def recipe_to_json(recipe: Recipe) -> str:
    return json.dumps(recipe.model_dump(mode="json"), indent=2, sort_keys=True)


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(recipe_to_json(recipe).encode()).hexdigest()[:16]


def recipe_from_json(text: str) -> Recipe:
    return Recipe.model_validate_json(text)

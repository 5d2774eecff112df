"""The built-in QLoRA trainer: `python -m supervisor.runner.train` (contract: docs/trainer-protocol.md).

Exit 0 on completion or on a SIGTERM stop (after the checkpoint is written); any other failure is an
uncaught exception: traceback on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.recipe import Recipe, recipe_from_json
from supervisor.runner.settings import pin_one_gpu

FLASH = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
TRAINER_TRACKERS = ("tensorboard", "trackio")  # train.report_to entries that transformers logs


class StopBeforeTraining(BaseException):
    """SIGTERM while loading or tokenising: nothing to save, so stop at once (BaseException: never swallowed)."""


@dataclass
class Context:
    """Everything the launcher told us, env vars and args merged."""

    recipe: Recipe
    events_path: str | None
    output_dir: Path
    resume: Path | None
    attempt: int
    external_prune: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m supervisor.runner.train",
        description="QLoRA SFT from a resolved recipe. Each option overrides its QLW_* env var.",
    )
    p.add_argument("--recipe", help="resolved recipe JSON (QLW_RECIPE); a .toml recipe also works")
    p.add_argument("--events", help="JSON-lines events file to append to (QLW_EVENTS)")
    p.add_argument("--output-dir", help="output folder, overrides train.output_dir (QLW_OUTPUT_DIR)")
    p.add_argument("--resume", help="checkpoint folder to resume from (QLW_RESUME)")
    p.add_argument("--attempt", type=int, help="attempt number, from 1 (QLW_ATTEMPT)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key, as `qlora-watch start --set` (repeatable; for runs by hand)",
    )
    return p.parse_args(argv)


def load_context(ns: argparse.Namespace, env: dict[str, str] | None = None) -> Context:
    """Merge args over env vars and read the recipe."""
    env = dict(os.environ if env is None else env)
    recipe_path = ns.recipe or env.get("QLW_RECIPE")
    if not recipe_path:
        raise SystemExit("error: no recipe: set QLW_RECIPE or pass --recipe PATH")
    recipe = read_recipe(recipe_path, ns.set)
    output_dir = Path(ns.output_dir or env.get("QLW_OUTPUT_DIR")
                      or recipe.train.output_dir.replace("{run_id}", env.get("QLW_RUN_ID", "manual")))
    resume = ns.resume or env.get("QLW_RESUME") or None
    if resume and not (Path(resume) / "trainer_state.json").is_file():
        raise SystemExit(f"error: resume checkpoint {resume} is not complete (no trainer_state.json)")
    return Context(
        recipe=recipe,
        events_path=ns.events or env.get("QLW_EVENTS") or None,
        output_dir=output_dir.expanduser().resolve(),
        resume=Path(resume).resolve() if resume else None,
        attempt=ns.attempt if ns.attempt is not None else int(env.get("QLW_ATTEMPT") or 1),
        external_prune=env.get("QLW_EXTERNAL_PRUNE") == "1",
    )


def read_recipe(path: str, overrides: list[str]) -> Recipe:
    """A resolved JSON recipe (what the supervisor passes) or a TOML one (by hand), plus --set."""
    from supervisor.recipe import apply_overrides, load_recipe, validate

    if path.endswith(".toml"):
        return load_recipe(path, overrides)
    recipe = recipe_from_json(Path(path).read_text(encoding="utf-8"))
    if not overrides:
        return recipe
    data = recipe.model_dump(mode="python")
    apply_overrides(data, overrides)
    return validate(data, path)


# ------------------------------------------------------------------------------ setup steps


def local_device() -> int:
    """This process's CUDA device: LOCAL_RANK under `accelerate launch`, else 0. Selected here,
    before the model loads, so that each rank quantises its weights onto its own card."""
    import torch

    index = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if torch.cuda.is_available() and torch.cuda.device_count() > index:
        torch.cuda.set_device(index)
    return index


def cap_vram(recipe: Recipe, writer: Any) -> Any:
    """[hardware] emulate_vram_gib (runner/emulate.py), then select this process's device.
    Returns the ballast helper's Popen (it dies with this process) or None."""
    from supervisor.runner.emulate import emulate_card

    return emulate_card(recipe, writer, local_device)


def _varlen(writer: Any) -> str:
    import torch

    from supervisor.runner import varlen

    how = varlen.register("cuda" if torch.cuda.is_available() else "cpu")
    writer.notice(f"attention varlen: padding-free batches, kernel {how}")
    return "varlen"


def pick_attention(requested: str, writer: Any, multi_gpu: bool = False) -> str:
    """The requested attention; flash_attention_* without flash-attn falls back (with a notice) to
    "varlen" on one CUDA GPU (PyTorch's own flash kernel, padding-free: +44 % over SDPA on the 8B
    shape, same losses, docs/benchmarks.md), else to sdpa (CPU; FSDP, not measured with varlen)."""
    if requested == "varlen":
        return _varlen(writer)
    module = FLASH.get(requested)
    if module is None:
        return requested
    if importlib.util.find_spec(module) is None:
        import torch

        if torch.cuda.is_available() and not multi_gpu:
            writer.notice("flash-attn not installed; using varlen (PyTorch's flash kernel, padding-free)")
            return _varlen(writer)
        writer.notice("flash-attn not installed; using sdpa")
        return "sdpa"
    from transformers.utils import import_utils

    check = getattr(import_utils, f"is_flash_attn_{requested[-1]}_available", None)
    if check is not None and not check():
        writer.notice(f"{requested} unusable here (needs CUDA and a supported flash-attn); using sdpa")
        return "sdpa"
    return requested


def resolve_model_path(ctx: Context, writer: Any) -> str:
    """recipe.model.name, or the locally built tiny model's folder when [model.tiny] is set."""
    recipe = ctx.recipe
    if recipe.model.tiny is None:
        return recipe.model.name
    from supervisor.runner.tiny import build_tiny, default_cache_root

    t0 = time.perf_counter()
    folder, cached = build_tiny(
        recipe.model.tiny,
        recipe.data.path,
        default_cache_root(ctx.output_dir),
        recipe.data.format,
    )
    how = "reused" if cached else f"built in {time.perf_counter() - t0:.1f}s"
    writer.notice(f"tiny model {how}: {folder}")
    return str(folder)


def describe_model(model: Any) -> str:
    """'4-bit nf4 (double quant), compute torch.bfloat16, 14 Linear4bit layers' or the plain dtype."""
    # bitsandbytes' own class only: peft's LoRA wrapper is also named Linear4bit (counted twice
    # when the model comes already wrapped, as Unsloth's does: seen on the H200)
    n4 = sum(1 for m in model.modules()
             if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"))
    q = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if not n4 or q is None or not getattr(q, "load_in_4bit", False):
        return f"not quantised, {model.dtype}"
    dq = ", double quant" if q.bnb_4bit_use_double_quant else ""
    return f"4-bit {q.bnb_4bit_quant_type}{dq}, compute {q.bnb_4bit_compute_dtype}, {n4} Linear4bit layers"


def use_cpu(recipe: Recipe) -> bool:
    """train.use_cpu, with "auto" meaning: CPU when CUDA is unavailable."""
    if recipe.train.use_cpu == "auto":
        import torch

        return not torch.cuda.is_available()
    return bool(recipe.train.use_cpu)


def liger_usable(recipe: Recipe, writer: Any) -> bool:
    """train.use_liger_kernel where it can work: a CUDA GPU and liger-kernel installed; otherwise
    a notice and training without it (the math is the same, only slower)."""
    if not recipe.train.use_liger_kernel:
        return False
    import torch

    if use_cpu(recipe) or not torch.cuda.is_available():
        writer.notice("use_liger_kernel: its Triton kernels need a CUDA GPU; training without them")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        writer.notice("use_liger_kernel: liger-kernel is not installed (pip install 'qlora-watch[gpu]'); "
                      "training without it (14.7 % slower on the 8B shape on an H200)")
        return False
    return True


def sft_config(ctx: Context, use_liger: bool | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """SFTConfig on current names: max_length, warmup_steps as a ratio, activation_checkpointing.
    `overrides` are the backend's (backends.sft_overrides); "checkpointing" means either name."""
    from trl import SFTConfig

    t = ctx.recipe.train
    cpu = use_cpu(ctx.recipe)
    over = dict(overrides or {})
    extra: dict[str, Any] = {}
    fields = getattr(SFTConfig, "__dataclass_fields__", {})
    # transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*; 5.17 has only the old
    ck = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    extra[ck] = over.pop("checkpointing", t.gradient_checkpointing)
    extra[f"{ck}_kwargs"] = {"use_reentrant": False}
    if not t.shuffle:  # data in file order (curricula; the GPU ladder benchmark relies on it)
        if "train_sampling_strategy" in fields:
            extra["train_sampling_strategy"] = "sequential"
        else:
            print("qlora-watch: train.shuffle=false needs transformers with train_sampling_strategy; "
                  "shuffling", file=sys.stderr)
    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.output_dir),
        max_length=t.max_seq_len,
        per_device_train_batch_size=t.per_device_batch,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        lr_scheduler_type=t.lr_scheduler,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        # With QLW_EXTERNAL_PRUNE=1 the supervisor deletes checkpoints: exactly one party may.
        save_total_limit=None if ctx.external_prune else t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # never replace a NaN loss with a running average
        include_num_input_tokens_seen="non_padding",
        # The supervisor writes W&B and MLflow itself (one writer, one tracker run across
        # attempts: supervisor/sinks/trackers.py); the trainer logs to TensorBoard and Trackio.
        report_to=[r for r in t.report_to if r in TRAINER_TRACKERS] or "none",
        run_name=os.environ.get("QLW_RUN_ID") or None,  # Trackio resumes its run by this name
        bf16=t.bf16,
        fp16=False,
        use_cpu=cpu,
        seed=t.seed,
        data_seed=t.seed,
        packing=t.packing,
        padding_free=t.padding_free,
        use_liger_kernel=t.use_liger_kernel if use_liger is None else use_liger,
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=True,  # progress goes to the events file; tqdm bars only bloat trainer.log
        save_only_model=False,  # optimizer + scheduler + rng: needed to resume exactly
    )
    return SFTConfig(**extra, **{**kwargs, **over})


def lora_config(recipe: Recipe) -> Any:
    from peft import LoraConfig

    from supervisor.runner.backends import lora_kwargs

    return LoraConfig(**lora_kwargs(recipe), task_type="CAUSAL_LM")


def with_lora(model: Any, recipe: Recipe, writer: Any = None) -> Any:
    """peft's LoRA around the base model (the HF path; trl would call the same get_peft_model),
    with the adapter weights created on the base model's GPU. peft makes each adapter Linear on
    the CPU, where nn.Linear and then peft initialise it (kaiming uniform on the CPU's generator,
    twice), and moves it over: 2.1 s of a relaunch for the 224 modules of the 8B shape at r 64 on
    the H200 box. Made on the GPU the same init takes milliseconds; its values come from the
    CUDA generator, which the seed sets as well, so every attempt draws the same adapter."""
    import contextlib

    import torch
    from peft import get_peft_model

    t0 = time.perf_counter()
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    where = torch.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
    with where:
        wrapped = get_peft_model(model, lora_config(recipe))
    timing(writer, "lora", time.perf_counter() - t0, device=str(device))
    return wrapped


def dataset_cache(recipe: Recipe, model_path: str, fmt: str, backend: str, writer: Any) -> Any:
    """The tokenised-dataset cache for this attempt (runner/dcache.py) and the key's parts known
    before the trainer exists; None without $QLW_DCACHE_DIR or on the Unsloth path (Unsloth
    patches trl's dataset preparation; it tokenises every attempt)."""
    from supervisor.runner import dcache, qcache

    root = os.environ.get(dcache.ENV_DIR)
    if not root or backend == "unsloth":
        return None
    parts = {"data": dcache.data_identity(recipe.data.path), "data_format": fmt,
             "max_samples": recipe.data.max_samples, "model": qcache.model_revision(model_path),
             "backend": backend}
    return dcache.DatasetCache(root, writer), parts


def timing(writer: Any, phase: str, seconds: float, **fields: Any) -> None:
    """A `timing` event: how long one phase of the attempt took (bench/relaunch.py reads them)."""
    if writer is not None:
        writer.emit("timing", phase=phase, s=round(seconds, 3), **fields)


def heavy_imports(backend: str, writer: Any, started_at: float | None) -> None:
    """Import the training stack now and say how long this process took to get here (the
    interpreter's start and these imports; ~0 when a warm standby had them done already)."""
    from supervisor.runner.backends import stack_modules

    t0 = time.perf_counter()
    for name in stack_modules(backend, after_unsloth=True):
        importlib.import_module(name)
    if started_at is None:
        try:
            import psutil

            started_at = psutil.Process().create_time()
        except Exception:  # noqa: BLE001
            started_at = None
    total = time.time() - started_at if started_at else time.perf_counter() - t0
    timing(writer, "imports", total, here_s=round(time.perf_counter() - t0, 3), warm=WARM["warm"])


WARM: dict[str, Any] = {"warm": False, "started_at": None}  # set by supervisor/standby.py


def trainer_class(writer: Any = None) -> type:
    """SFTTrainer whose resume keeps the adapter dtypes that a fresh start uses."""
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        dataset_s = 0.0  # time in trl's dataset preparation (tokenising, truncating), for the timing event
        dataset_cache: Any = None  # (DatasetCache, the key's parts known before the trainer): run() sets it

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, packing: bool,
                             formatting_func: Any, dataset_name: str) -> Any:
            t0 = time.perf_counter()
            try:
                return self._prepare_cached(dataset, processing_class, args, packing, formatting_func,
                                            dataset_name)
            finally:
                type(self).dataset_s += time.perf_counter() - t0

        def _prepare_cached(self, dataset: Any, processing_class: Any, args: Any, packing: bool,
                            formatting_func: Any, dataset_name: str) -> Any:
            """trl's preparation through the tokenised-dataset cache (runner/dcache.py): the
            records tokenised without max_length or packing once per run, then trl truncates or
            packs that for this attempt's max_length as it would in one pass."""
            import copy

            from datasets import Dataset

            setup = type(self).dataset_cache
            if (setup is None or formatting_func is not None or not isinstance(dataset, Dataset)
                    or "input_ids" in dataset.column_names):
                return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func,
                                                dataset_name)
            from supervisor.runner import dcache

            cache, parts = setup
            settings = {"dataset_text_field": args.dataset_text_field,
                        "assistant_only_loss": args.assistant_only_loss,
                        "completion_only_loss": getattr(self, "completion_only_loss", None),
                        "chat_template": getattr(self, "chat_template", None),
                        "eos_token": getattr(getattr(self, "_tokenizer", None), "eos_token", None),
                        "dataset_name": dataset_name}
            inputs = dcache.key_inputs(**parts, tokenizer=processing_class, settings=settings)
            t0 = time.perf_counter()
            prepared = cache.load(inputs) if inputs is not None else None
            if prepared is not None:
                timing(writer, "dataset_cache_load", time.perf_counter() - t0, rows=len(prepared))
                if writer is not None:
                    writer.notice(f"dataset cache: {len(prepared)} tokenised records loaded "
                                  f"({dcache.cache_key(inputs)})")
            else:
                unbounded = copy.copy(args)
                unbounded.max_length = None
                prepared = super()._prepare_dataset(dataset, processing_class, unbounded, False, None,
                                                    dataset_name)
                if inputs is not None and cache.save(inputs, prepared) is not None:
                    timing(writer, "dataset_cache_save", time.perf_counter() - t0, rows=len(prepared))
            return super()._prepare_dataset(prepared, processing_class, args, packing, None, dataset_name)

        def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
            t0 = time.perf_counter()
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint:
                timing(writer, "optimizer_restore", time.perf_counter() - t0)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            t0 = time.perf_counter()
            self._restore_adapter(resume_from_checkpoint, model)
            timing(writer, "adapter_restore", time.perf_counter() - t0)

        def _restore_adapter(self, resume_from_checkpoint: str, model: Any = None) -> None:
            # trl casts QLoRA adapters to bf16, but peft's load_adapter re-upcasts them to fp32
            # on resume: 2x adapter + grad memory (~0.7 GB at r=64 on 8B), so a run that fit
            # could OOM after a relaunch. The optimizer is built after this, so a cast is safe.
            target = model if model is not None else self.model
            before = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, param in target.named_parameters():
                if param.requires_grad and name in before and param.dtype != before[name]:
                    param.data = param.data.to(before[name])

    return Trainer


def padding_free_collator(recipe: Recipe, attn: str, unsloth: bool, tokenizer: Any) -> Any:
    """attention "varlen" on the HF path: trl's padding-free collator (None: trl's default). With
    packing or padding_free set, trl builds padding-free batches itself."""
    if attn != "varlen" or unsloth or recipe.train.packing or recipe.train.padding_free:
        return None
    from supervisor.runner.varlen import collator

    return collator(tokenizer)


def debug_callback(recipe: Recipe) -> Any:
    """The [debug] knobs as a TrainerCallback, or None when none is set."""
    from transformers import TrainerCallback

    d = recipe.debug
    oom = d.raise_oom_above_seq_len is not None and recipe.train.max_seq_len > d.raise_oom_above_seq_len
    if not oom and d.step_sleep_s <= 0:
        return None
    save_steps = recipe.train.save_steps

    class DebugCallback(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if oom:
                # After 2 x save_steps steps (capped below max_steps) so two checkpoints exist.
                at = 2 * save_steps
                if state.max_steps > 0:
                    at = min(at, state.max_steps - 1)
                if state.global_step >= max(1, at):
                    import torch

                    raise torch.OutOfMemoryError(
                        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                        "24.00 GiB of which 1.12 GiB is free. (qlora-watch debug.raise_oom_above_seq_len="
                        f"{d.raise_oom_above_seq_len}, max_seq_len={recipe.train.max_seq_len})"
                    )
            if d.step_sleep_s > 0:
                time.sleep(d.step_sleep_s)
            return control

    return DebugCallback()


# ------------------------------------------------------------------------------ main


def _stop_before_training(signum: int, frame: Any) -> None:
    raise StopBeforeTraining()


def quiet_progress_bars() -> None:
    """No tqdm bars: they are \r-redrawn lines that bloat trainer.log; events carry progress."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def run(ctx: Context, pinned_gpu: str | None = None) -> int:
    """Load, tokenise, train, save; returns the exit code (exceptions propagate)."""
    from supervisor.runner.backends import choose_backend, load_with_fallback, sft_overrides

    backend = choose_backend(ctx.recipe)  # first: Unsloth must be imported before transformers
    from supervisor.runner.callback import EventWriter, QloraWatchCallback

    writer = EventWriter(ctx.events_path)
    heavy_imports(backend.name, writer, WARM["started_at"])
    if pinned_gpu is not None:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() >= 1:
            writer.notice(f"hardware.gpus = 1: training on GPU {pinned_gpu} only "
                          "(set CUDA_VISIBLE_DEVICES in [env] to pick another)")
    recipe = ctx.recipe
    signal.signal(signal.SIGTERM, _stop_before_training)
    try:
        writer.phase("loading_model")
        quiet_progress_bars()
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        # transformers 5 dropped TrainingArguments.logging_dir; the TensorBoard callback reads this.
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(ctx.output_dir / "tensorboard"))
        t_card = time.perf_counter()
        ballast = cap_vram(recipe, writer)  # noqa: F841 - held until this process exits
        if recipe.hardware.emulate_vram_gib:
            timing(writer, "emulate_card", time.perf_counter() - t_card)  # the rehearsal's own cost
        attn = functools.partial(pick_attention, recipe.model.attn_implementation, writer,
                                 recipe.hardware.gpus > 1)  # resolved only if the HF path loads
        path = resolve_model_path(ctx, writer)
        writer.notice(f"backend {backend.name}: {backend.reason}")
        chosen = backend
        backend, model, tokenizer = load_with_fallback(chosen, recipe, path, attn, writer=writer,
                                                       device="cpu" if use_cpu(recipe) else "cuda")
        if backend is not chosen:
            writer.notice(f"backend {backend.name}: {backend.reason}")
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        writer.notice(f"model {recipe.model.name}: {describe_model(model)}, attention {attn}")

        writer.phase("tokenising")
        from supervisor.runner.data import load_records, to_dataset

        records, fmt = load_records(recipe.data.path, recipe.data.format, recipe.data.max_samples)
        writer.notice(f"data: {len(records)} records, format {fmt}, from {recipe.data.path}")
        watch = QloraWatchCallback(writer=writer)
        callbacks = [watch] + [cb for cb in [debug_callback(recipe)] if cb is not None]
        unsloth = backend.name == "unsloth"
        t_init = time.perf_counter()
        if not unsloth:  # Unsloth's model has its LoRA already
            model = with_lora(model, recipe, writer)
        trainer_cls = trainer_class(writer)
        trainer_cls.dataset_cache = dataset_cache(recipe, path, fmt, backend.name, writer)
        trainer = trainer_cls(
            model=model,
            args=sft_config(ctx, use_liger=False if unsloth else liger_usable(recipe, writer),
                            overrides=sft_overrides(backend, recipe)),
            train_dataset=to_dataset(records),
            processing_class=tokenizer,
            peft_config=None,  # the model has its LoRA (with_lora, or Unsloth's own)
            data_collator=padding_free_collator(recipe, attn, unsloth, tokenizer),
            callbacks=callbacks,
        )
        timing(writer, "trainer_init", time.perf_counter() - t_init,  # with the LoRA (phase "lora")
               dataset_s=round(trainer_cls.dataset_s, 3))
        trainable, total = trainer.model.get_nb_trainable_parameters()
        writer.notice(f"LoRA r={recipe.lora.r}: {trainable:,} trainable of {total:,} parameters")
        if ctx.resume:
            writer.notice(f"resuming from {ctx.resume}")
        # From here SIGTERM only sets a flag; the callback saves and stops at the next step end.
        signal.signal(signal.SIGTERM, watch.request_stop)
        trainer.train(resume_from_checkpoint=str(ctx.resume) if ctx.resume else None)
    except StopBeforeTraining:
        writer.phase("stopped")
        writer.close()
        return 0

    if watch.stopped_at is not None:
        writer.phase("stopped")  # the checkpoint is on disk; no final adapter on a stop
        writer.close()
        return 0
    writer.phase("saving")
    adapter = ctx.output_dir / "adapter"
    if getattr(trainer, "is_fsdp_enabled", False):
        # SHARDED_STATE_DICT (the checkpoints' format) makes save_model write nothing at all:
        # gather the full state dict once for the final adapter (found on 2 x H200)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter))  # a PeftModel saves only the adapter; every rank takes part
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(adapter))
    writer.emit("finished", step=trainer.state.global_step, adapter_path=str(adapter))
    writer.phase("finished")
    writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ctx = load_context(parse_args(argv))
    return run(ctx, pinned_gpu=pin_one_gpu(ctx.recipe))


if __name__ == "__main__":
    sys.exit(main())

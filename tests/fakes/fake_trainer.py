#!/usr/bin/env python3
"""A scripted fake trainer (no torch) that speaks the trainer protocol.

It writes the same JSON-lines events and the same checkpoint layout as the real trainer
(transformers 5: adapter, optimizer, scheduler, rng, then trainer_state.json last), and can
misbehave on cue. Every knob is a flag, so a test recipe's `[trainer] command` scripts it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import signal
import struct
import sys
import time
from pathlib import Path

STOP = {"requested": False}


BEST_EFFORT = {"events": False}
CLOCK = {"offset": 0.0}  # --clock-jump-at: the trainer's wall clock steps by this much


def emit(path: str | None, obj: dict) -> None:
    if not path:
        return
    obj = {"t": time.time() + CLOCK["offset"], **obj}
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")
    except OSError:
        if not BEST_EFFORT["events"]:  # --events-best-effort: a full disk drops events
            raise


def write_safetensors(path: Path, nbytes: int = 256) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * nbytes)


NO_ADAPTER = {"on": False}  # --no-adapter: a full fine-tune's layout (model.safetensors)


def save_checkpoint(out: Path, step: int, slowly: float, events: str | None, max_steps: int,
                    nbytes: int = 128) -> Path:
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True, exist_ok=True)
    emit(events, {"event": "phase", "phase": "saving"})
    if NO_ADAPTER["on"]:
        write_safetensors(ck / "model.safetensors")
    else:
        write_safetensors(ck / "adapter_model.safetensors")
        (ck / "adapter_config.json").write_text(json.dumps({"r": 8}))
    time.sleep(slowly)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (ck / name).write_bytes(os.urandom(nbytes if name == "optimizer.pt" else 128))
        time.sleep(slowly)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    emit(events, {"event": "checkpoint", "step": step, "path": str(ck.resolve())})
    emit(events, {"event": "phase", "phase": "training"})
    return ck


def worker(escape: bool) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's save-on-SIGTERM handler
    if escape:
        os.setsid()
    while True:
        time.sleep(1)


def spawn_orphan(seconds: float) -> None:
    """Double fork: a grandchild that outlives its parent is re-parented to the subreaper."""
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            time.sleep(seconds)
        os._exit(0)
    os.waitpid(pid, 0)


def record_signal(path: str, signum: int) -> None:
    with open(path, "a") as f:
        f.write(f"{signal.Signals(signum).name} {time.time()}\n")


def oom_exit(step: int) -> None:
    sys.stderr.write(
        "Traceback (most recent call last):\n"
        '  File "train.py", line 120, in <module>\n'
        "    trainer.train()\n"
        f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
        f"capacity of 23.99 GiB of which 1.10 GiB is free. (step {step})\n"
    )
    sys.stderr.flush()
    os._exit(1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-time", type=float, default=0.02)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--save-slowly", type=float, default=0.0)
    ap.add_argument("--ignore-sigterm", action="store_true")
    ap.add_argument("--oom-at", type=int, default=None)
    ap.add_argument("--oom-above-seq", type=int, default=None,
                    help="OOM only while the recipe's max_seq_len is above this")
    ap.add_argument("--crash-at", type=int, default=None)
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--escape", action="store_true")
    ap.add_argument("--hang-at", type=int, default=None)
    ap.add_argument("--nan-from", type=int, default=None)
    ap.add_argument("--garbage", action="store_true")
    ap.add_argument("--print-env", action="store_true")
    ap.add_argument("--print-oom-text", action="store_true", help="print OOM text as data, exit 0")
    ap.add_argument("--record", default=None)
    ap.add_argument("--load-time", type=float, default=0.0)
    ap.add_argument("--download", default=None, metavar="DIR",
                    help="while loading, write a blob into DIR slowly, as the Hub client does")
    ap.add_argument("--download-bytes", type=int, default=1 << 20)
    ap.add_argument("--download-rate", type=float, default=256 * 1024.0, help="bytes per second")
    ap.add_argument("--sigterm-save", action="store_true",
                    help="on SIGTERM finish the step, save, exit 0 (the default; for the plan's name)")
    ap.add_argument("--crash-after", type=int, default=None,
                    help="crash (exit 1) after this many steps of this attempt")
    ap.add_argument("--leave-workers", action="store_true",
                    help="exit without stopping the workers (they outlive the trainer)")
    ap.add_argument("--spawn-orphans", type=int, default=0,
                    help="each step, double-fork this many short-lived grandchildren")
    ap.add_argument("--flood-mb", type=float, default=0.0, help="print this many MB at once, fast")
    ap.add_argument("--ckpt-bytes", type=int, default=128, help="size of optimizer.pt")
    ap.add_argument("--record-signals", default=None, help="append SIGTERM/SIGCONT arrivals here")
    ap.add_argument("--events-best-effort", action="store_true",
                    help="drop events instead of crashing when the events file cannot be written")
    ap.add_argument("--clock-jump-at", type=int, default=None,
                    help="from this step on, event timestamps are shifted by --clock-jump-s")
    ap.add_argument("--clock-jump-s", type=float, default=-3600.0)
    ap.add_argument("--once-file", default=None,
                    help="misbehave (oom/crash/hang/nan) only while this file does not exist")
    ap.add_argument("--stop-on-sigint", action="store_true",
                    help="SIGINT (not SIGTERM) asks for save-then-stop")
    ap.add_argument("--no-adapter", action="store_true", help="checkpoints hold model.safetensors only")
    ap.add_argument("--seq-from-env", action="store_true",
                    help="the sequence length is $QLW_MAX_SEQ_LEN (else 1024), not the recipe's")
    ap.add_argument("--no-events", action="store_true", help="write no events (a foreign trainer)")
    args, _ = ap.parse_known_args()
    NO_ADAPTER["on"] = args.no_adapter
    if args.once_file:
        if Path(args.once_file).exists():
            args.oom_at = args.crash_at = args.hang_at = args.nan_from = None
        else:
            Path(args.once_file).touch()

    BEST_EFFORT["events"] = args.events_best_effort
    events = None if args.no_events else os.environ.get("QLW_EVENTS")
    out = Path(os.environ.get("QLW_OUTPUT_DIR", "fake-out"))
    out.mkdir(parents=True, exist_ok=True)
    resume = os.environ.get("QLW_RESUME")
    recipe = {}
    if os.environ.get("QLW_RECIPE"):
        recipe = json.loads(Path(os.environ["QLW_RECIPE"]).read_text())
    seq = recipe.get("train", {}).get("max_seq_len")
    if args.seq_from_env:
        seq = int(os.environ.get("QLW_MAX_SEQ_LEN") or 1024)

    if args.record:
        with open(args.record, "a") as f:
            f.write(json.dumps({
                "argv": sys.argv, "resume": resume, "env_keys": sorted(os.environ),
                "max_seq_len": seq, "lora_r": recipe.get("lora", {}).get("r"),
                "per_device_batch": recipe.get("train", {}).get("per_device_batch"),
                "grad_accum": recipe.get("train", {}).get("grad_accum"),
                "output_dir": str(out), "attempt": os.environ.get("QLW_ATTEMPT"),
                "pid": os.getpid(), "t": time.time(), "cwd": os.getcwd(),
                "qlw_env": {k: v for k, v in os.environ.items() if k.startswith("QLW_")},
                "seq": seq,
            }) + "\n")

    def on_term(signum: int, *_: object) -> None:
        if args.record_signals:
            record_signal(args.record_signals, signum)
        STOP["requested"] = True

    if args.record_signals:
        signal.signal(signal.SIGCONT, lambda signum, _f: record_signal(args.record_signals, signum))

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif args.stop_on_sigint:
        signal.signal(signal.SIGINT, on_term)
    else:
        signal.signal(signal.SIGTERM, on_term)

    if args.print_env:
        print("argv: " + " ".join(sys.argv), flush=True)
        for k, v in sorted(os.environ.items()):
            print(f"{k}={v}", flush=True)
    if args.flood_mb:
        line = b"flood " + b"y" * 200 + b"\n"
        raw = sys.stdout.buffer
        for _ in range(int(args.flood_mb * 1e6 / len(line))):
            raw.write(line)
        raw.flush()
    if args.garbage:
        sys.stdout.flush()
        raw = sys.stdout.buffer
        raw.write(b"\xff\xfe binary \x00 NUL \x1b[31mred\x1b[0m \x1b]52;c;SGVsbG8=\x07 \x1b]0;title\x07 \x1b[2J\n")
        raw.write(b"x" * (10 * 1024 * 1024))  # a 10 MB line with no newline
        raw.write(b"\r" + b"progress 1%\r" * 1000 + b"\n")
        raw.flush()
        emit(events, {"event": "step", "step": "garbage"})
        if events:
            with open(events, "ab") as f:
                f.write(b"\xff\xfe not json\n{\"event\": \"step\", \"step\": 1, \"loss\": \"NaN\"}\n")
    if args.print_oom_text:
        print("note: CUDA out of memory is something this model never hits", flush=True)

    kids = [multiprocessing.Process(target=worker, args=(args.escape,), daemon=False)
            for _ in range(args.workers)]
    for k in kids:
        k.start()

    emit(events, {"event": "phase", "phase": "loading_model"})
    time.sleep(args.load_time)
    if args.download:  # blobs/<sha>.incomplete grows, then is renamed (huggingface_hub's way)
        blobs = Path(args.download) / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        part = blobs / "0123abcd.incomplete"
        chunk, done = max(1, int(args.download_rate / 10)), 0
        with open(part, "ab") as f:
            while done < args.download_bytes:
                f.write(b"\0" * min(chunk, args.download_bytes - done))
                f.flush()
                done += chunk
                time.sleep(0.1)
        part.rename(blobs / "0123abcd")
    start = 0
    if resume:
        start = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
    emit(events, {"event": "phase", "phase": "training"})
    print(f"fake trainer: training from step {start} to {args.steps}", flush=True)
    step = start
    while step < args.steps:
        step += 1
        time.sleep(args.step_time)
        if args.clock_jump_at is not None and step >= args.clock_jump_at:
            CLOCK["offset"] = args.clock_jump_s
        for _ in range(args.spawn_orphans):
            spawn_orphan(0.05)
        if args.oom_at is not None and step >= args.oom_at and (args.oom_above_seq is None or (seq or 0) > args.oom_above_seq):
            oom_exit(step)
        if args.crash_at is not None and step >= args.crash_at:
            sys.stderr.write("Traceback (most recent call last):\nRuntimeError: fake crash\n")
            sys.stderr.flush()
            os._exit(1)
        if args.crash_after is not None and step - start >= args.crash_after:
            sys.stderr.write(f"Traceback (most recent call last):\nRuntimeError: fake crash after step {step}\n")
            sys.stderr.flush()
            os._exit(1)
        if args.hang_at is not None and step >= args.hang_at:
            while True:
                time.sleep(1)
        loss = 2.0 * math.exp(-step / 50)
        grad = 0.5
        if args.nan_from is not None and step >= args.nan_from:
            loss, grad = float("nan"), float("nan")
        emit(events, {"event": "step", "step": step, "max_steps": args.steps, "loss": loss,
                      "grad_norm": grad, "lr": 1e-4, "epoch": step / args.steps,
                      "tokens": step * 1000, "tokens_per_s": 1000 / max(args.step_time, 1e-3),
                      "step_time_s": args.step_time})
        print(f"{{'loss': '{loss:.4f}', 'grad_norm': '{grad}', 'learning_rate': '0.0001'}}", flush=True)
        if STOP["requested"]:
            save_checkpoint(out, step, args.save_slowly, events, args.steps, args.ckpt_bytes)
            emit(events, {"event": "phase", "phase": "stopped"})
            return finish(kids, args, 0)
        if step % args.save_every == 0:
            save_checkpoint(out, step, args.save_slowly, events, args.steps, args.ckpt_bytes)
    adapter = out / "adapter"
    adapter.mkdir(exist_ok=True)
    write_safetensors(adapter / "adapter_model.safetensors")
    emit(events, {"event": "finished", "step": step, "adapter_path": str(adapter.resolve())})
    emit(events, {"event": "phase", "phase": "finished"})
    return finish(kids, args, args.exit_code)


def finish(kids: list, args: argparse.Namespace, code: int) -> int:
    if args.leave_workers and kids:
        sys.stdout.flush()
        os._exit(code)  # no atexit join: the workers outlive the trainer
    for k in kids:
        k.terminate()
    return code


if __name__ == "__main__":
    raise SystemExit(main())

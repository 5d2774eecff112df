"""`QloraWatchCallback`: stream a HF Trainer's progress as JSON lines and stop cleanly on SIGTERM.

Usable from any transformers Trainer script (it imports only transformers and the stdlib):

    trainer = Trainer(..., callbacks=[QloraWatchCallback()])   # events path from $QLW_EVENTS
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from transformers import TrainerCallback

PHASES = ("loading_model", "tokenising", "training", "saving", "finished", "stopped")


class EventWriter:
    """Append JSON lines to a file: one os.write() per line, so readers never see half a line."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        # Under `accelerate launch` (several GPUs) every rank runs this code: only rank 0 speaks,
        # so the supervisor sees one step stream, not one per card.
        if os.environ.get("RANK", "0") not in ("", "0"):
            path = None
        self.path = os.fspath(path) if path else None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        if self.path:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            # O_APPEND: each write lands at the end even if another process appends too.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write {"t": now, "event": event, **fields}; NaN/inf are written as NaN/Infinity."""
        record = {"t": round(time.time(), 3), "event": event, **fields}
        if self._fd is None:
            return record
        data = (json.dumps(record, default=str) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(data)
            try:
                while view:  # a regular file takes it whole; the loop only guards odd filesystems
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as e:  # a full disk must not kill training: drop the event, say so once
                self.dropped += 1
                if self.dropped == 1:
                    print(f"qlora-watch: events not written ({e.strerror}); training goes on",
                          file=sys.stderr, flush=True)
        return record

    def phase(self, phase: str) -> None:
        self.emit("phase", phase=phase)

    def notice(self, message: str, **fields: Any) -> None:
        self.emit("notice", message=message, **fields)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _num(x: Any) -> float | None:
    """A JSON number from a log value (float, int, 0-d tensor, numeric string), or None."""
    if x is None:
        return None
    try:
        return float(x.item() if hasattr(x, "item") else x)
    except (TypeError, ValueError):
        return None


def _cuda_peaks() -> dict[str, float]:
    """The allocator's peaks so far (MiB): what preflight's estimate is calibrated against."""
    import sys

    torch = sys.modules.get("torch")  # never import torch here: a user's script already has
    if torch is None or not torch.cuda.is_available():
        return {}
    return {
        "cuda_peak_alloc_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "cuda_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
    }


class QloraWatchCallback(TrainerCallback):
    """Writes phase/step/checkpoint events and turns SIGTERM into save-then-stop at a step boundary."""

    def __init__(
        self,
        events_path: str | os.PathLike[str] | None = None,
        *,
        writer: EventWriter | None = None,
        handle_sigterm: bool = True,
    ) -> None:
        self.writer = writer or EventWriter(events_path or os.environ.get("QLW_EVENTS"))
        self.handle_sigterm = handle_sigterm
        self.stop_requested = False
        self.stopped_at: int | None = None  # the step we saved and stopped at, after a stop request
        self._step_t0: float | None = None
        self._step_times: list[float] = []
        self._last_log_t: float | None = None
        self._last_log_tokens = 0
        self._train_begin: float | None = None  # perf_counter at on_train_begin, until the first step
        self._first: dict[str, float] = {}  # the first step's marks (perf_counter), for its timing event

    # ---------------------------------------------------------------- stop requests

    def request_stop(self, *_: Any) -> None:
        """Ask for a checkpoint and a stop at the next step boundary (safe from a signal handler)."""
        self.stop_requested = True

    def install_sigterm_handler(self) -> bool:
        """Route SIGTERM to request_stop(); False when not on the main thread (signals need it)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(signal.SIGTERM, self.request_stop)
        return True

    # ---------------------------------------------------------------- trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.handle_sigterm:
            self.install_sigterm_handler()
        self._last_log_t = time.time()
        self._last_log_tokens = int(state.num_input_tokens_seen or 0)
        self._train_begin = time.perf_counter()
        self.writer.phase("training")
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._step_t0 = time.perf_counter()
        if self._train_begin is not None:
            self._first.setdefault("step_begin", self._step_t0)
        return control

    def _mark_first(self, name: str) -> None:
        """A mark inside the first step, after the GPU has finished the work queued so far (one
        synchronize per mark, in the first step only), so that the marks split it truthfully."""
        if self._train_begin is None or name in self._first:
            return
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self._first[name] = time.perf_counter()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._mark_first("backward_end")
        return control

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._mark_first("optimizer_end")
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._step_t0 is not None:
            self._step_times.append(time.perf_counter() - self._step_t0)
            self._step_t0 = None
        if self._train_begin is not None:  # the first step of this attempt, with its warm-up
            now = time.perf_counter()
            parts, last = {}, self._train_begin
            for mark, field in (("step_begin", "setup_s"), ("backward_end", "forward_backward_s"),
                                ("optimizer_end", "optimizer_s")):
                if mark in self._first:
                    parts[field] = round(self._first[mark] - last, 3)
                    last = self._first[mark]
            if parts:
                parts["after_s"] = round(now - last, 3)
            self.writer.emit("timing", phase="first_step", s=round(now - self._train_begin, 3),
                             step=state.global_step, **parts)
            self._train_begin = None
            self._first.clear()
        if self.stop_requested and self.stopped_at is None:
            # The Trainer saves (control.should_save) before it breaks out of the loop.
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True
            self.stopped_at = state.global_step
        if control.should_save and not control.should_log:
            self.writer.phase("saving")  # when logging too, on_log says it after the step event
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        logs = logs or {}
        if "loss" not in logs:  # the end-of-training summary, eval metrics: not a step
            return control
        now = time.time()
        tracked = getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False, None)
        tokens = int(state.num_input_tokens_seen) if tracked else None
        tokens_per_s = None
        if tokens is not None and self._last_log_t is not None and now > self._last_log_t:
            tokens_per_s = round((tokens - self._last_log_tokens) / (now - self._last_log_t), 2)
        step_time = sum(self._step_times) / len(self._step_times) if self._step_times else None
        self.writer.emit(
            "step",
            step=state.global_step,
            max_steps=state.max_steps,
            loss=_num(logs.get("loss")),
            grad_norm=_num(logs.get("grad_norm")),
            lr=_num(logs.get("learning_rate")),
            epoch=_num(logs.get("epoch", state.epoch)),
            tokens=tokens,
            tokens_per_s=tokens_per_s,
            step_time_s=None if step_time is None else round(step_time, 4),
            **_cuda_peaks(),
        )
        self._step_times.clear()
        self._last_log_t = now
        self._last_log_tokens = tokens or 0
        if control.should_save:  # the Trainer saves right after logging
            self.writer.phase("saving")
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        path = os.path.abspath(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            self.writer.emit("checkpoint", step=state.global_step, path=path)
        else:  # a custom save layout: say so rather than claim a complete checkpoint
            self.writer.notice(f"saved at step {state.global_step} but {path}/trainer_state.json is missing")
        if not control.should_training_stop:
            self.writer.phase("training")
        return control


"""The supervisor's telemetry as TensorBoard scalars, beside the trainer's own logs.

The trainer logs to `<output_dir>/tensorboard` (TENSORBOARD_LOGGING_DIR in runner/train.py);
this writes `<output_dir>/tensorboard/system`, so `tensorboard --logdir <output_dir>` shows the
loss and the GPU/host readings side by side. The supervisor never imports torch, so this uses
tensorboard's own protobufs and record writer, synchronously (no writer thread), and never
raises into the caller: the first write error is logged once and the writer turns itself off.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from supervisor.numbers import finite
from supervisor.records import Event, EventKind, GpuSample, Sample

log = logging.getLogger("qlora-watch.tbwriter")

SYSTEM_SUBDIR = "system"
GIB_PER_MIB = 1.0 / 1024.0
# nvmlClocksEventReason bits that cost speed: sw power cap, hw slowdown, sw/hw thermal, power brake.
THROTTLE_BITS = 0x4 | 0x8 | 0x20 | 0x40 | 0x80


def system_logdir(output_dir: str | os.PathLike[str]) -> Path:
    """Where the supervisor's scalars go for a run whose train.output_dir is `output_dir`."""
    return Path(output_dir) / "tensorboard" / SYSTEM_SUBDIR


def _field(g: Any, name: str) -> Any:
    return g.get(name) if isinstance(g, dict) else getattr(g, name, None)


def throttle_reasons(g: GpuSample | dict[str, Any]) -> list[str]:
    """The thermal/power throttle reasons active on one GPU reading ([] when not throttled)."""
    words = [str(r) for r in (_field(g, "throttle_reasons") or [])]
    keep = []
    for w in words:
        key = w.lower().replace(" ", "").replace("_", "")
        if "thermal" in key or "power" in key or key == "hwslowdown":
            keep.append(w)
    mask = _field(g, "throttle_mask")
    if not keep and isinstance(mask, int) and mask & THROTTLE_BITS:
        keep.append(f"mask {mask & THROTTLE_BITS:#x}")
    return keep


def sample_scalars(sample: Sample) -> dict[str, float]:
    """tag -> value for one sample; unreadable sensors (None) are left out, not written as 0."""
    out: dict[str, float] = {}
    for g in sample.gpus:
        if g.lost:
            continue
        p = f"system/gpu{g.index}/"
        mem = finite(g.mem_used_mib)
        values = {
            "temp_c": g.temp_c, "hotspot_c": g.hotspot_c, "mem_temp_c": g.mem_temp_c,
            "util_pct": g.util_pct, "power_w": g.power_w,
            "mem_used_gib": mem * GIB_PER_MIB if mem is not None else None,
            "sm_clock_mhz": g.sm_clock_mhz,
        }
        for k, v in values.items():
            f = finite(v)
            if f is not None:
                out[p + k] = f
        if g.throttle_mask is not None or g.throttle_reasons:
            out[p + "throttle"] = 1.0 if throttle_reasons(g) else 0.0
    h = sample.host
    for k, v in (("mem_available_gib", h.mem_available_mib), ("swap_used_gib", h.swap_used_mib),
                 ("trainer_rss_gib", h.trainer_rss_mib)):
        f = finite(v)
        if f is not None:
            out["host/" + k] = f * GIB_PER_MIB
    disk = finite(h.disk_free_gib)
    if disk is not None:
        out["host/disk_free_gib"] = disk
    return out


class TelemetryTB:
    """Append-only TensorBoard event file of supervisor telemetry; every method is failure-proof."""

    def __init__(self, logdir: str | os.PathLike[str]):
        self.logdir = Path(logdir)
        self.disabled = False
        self.error: str | None = None
        self._file: Any = None
        self._writer: Any = None
        self._counter = 0  # x for samples taken before the first training step
        self._last_step = 0
        self._throttled: dict[int, bool] = {}

    # -- plumbing -------------------------------------------------------------------------
    def _open(self) -> bool:
        if self.disabled:
            return False
        if self._writer is not None:
            return True
        try:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                    f"{os.getpid()}.qlora-watch")
            self._file = open(self.logdir / name, "ab")
            self._writer = RecordWriter(self._file)
            head = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._writer.write(head.SerializeToString())
            self._file.flush()
        except Exception as e:  # noqa: BLE001 - telemetry must never stop supervision
            self._fail(e)
            return False
        return True

    def _fail(self, e: BaseException) -> None:
        self.error = f"{type(e).__name__}: {e}"
        if not self.disabled:
            log.warning("TensorBoard telemetry disabled (%s); logdir %s", self.error, self.logdir)
        self.disabled = True
        f, self._file, self._writer = self._file, None, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - e.g. ENOSPC again on the final flush
                pass

    def _emit(self, walltime: float, step: int, values: list[Any]) -> None:
        if not values or not self._open():
            return
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            ev = event_pb2.Event(wall_time=walltime, step=int(step),
                                 summary=summary_pb2.Summary(value=values))
            self._writer.write(ev.SerializeToString())
            self._file.flush()  # one small write a second: TensorBoard sees it at once
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    @staticmethod
    def _scalar(tag: str, value: float) -> Any:
        from tensorboard.compat.proto import summary_pb2

        return summary_pb2.Summary.Value(tag=tag, simple_value=float(value))

    @staticmethod
    def _text(tag: str, text: str) -> Any:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        return summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)

    # -- public -----------------------------------------------------------------------------
    def add_sample(self, sample: Sample, step: int | None) -> None:
        """One telemetry sample at `step` (the trainer's step if known, else a sample counter)."""
        if self.disabled:
            return
        try:
            if step is None:
                x = self._counter
            else:
                x = self._last_step = int(step)
            self._counter += 1
            values = [self._scalar(k, v) for k, v in sample_scalars(sample).items()]
            for g in sample.gpus:
                reasons = throttle_reasons(g) if not g.lost else []
                was = self._throttled.get(g.index, False)
                if bool(reasons) != was:
                    self._throttled[g.index] = bool(reasons)
                    what = f"throttling: {', '.join(reasons)}" if reasons else "throttling ended"
                    values.append(self._text("events/log", f"GPU {g.index} {what}"))
                    values.append(self._scalar("events/throttle", 1.0 if reasons else 0.0))
            self._emit(float(sample.t), x, values)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def add_event(self, event: Event) -> None:
        """A supervisor event as a text entry; guard, relaunch and throttle events also as a 1."""
        if self.disabled:
            return
        try:
            head = f"[{event.level}] {event.kind}" + (f" ({event.guard})" if event.guard else "")
            att = f" attempt {event.attempt}" if event.attempt is not None else ""
            values = [self._text("events/log", f"{head}{att}: {event.message}")]
            if event.kind == EventKind.RELAUNCH_SCHEDULED:
                values.append(self._scalar("events/relaunch", 1.0))
            if event.kind == EventKind.GUARD_FIRED and event.guard:
                values.append(self._scalar(f"events/guard/{event.guard}", 1.0))
            if "throttl" in event.message.lower():
                values.append(self._scalar("events/throttle", 1.0))
            self._emit(float(event.t), self._last_step, values)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        """Flush and close; safe to call twice or after a failure; later adds are ignored."""
        self.disabled = True
        f, self._file, self._writer = self._file, None, None
        if f is None:
            return
        try:
            f.close()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

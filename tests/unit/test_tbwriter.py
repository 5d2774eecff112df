"""TelemetryTB: scalars readable by TensorBoard, no torch import, never raises into the caller."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.records import Event, GpuSample, HostSample, Sample
from supervisor.sinks.tbwriter import TelemetryTB, system_logdir, throttle_reasons


def _sample(t: float, temp: float, throttled: bool = False) -> Sample:
    g = GpuSample(index=0, util_pct=97.0, mem_used_mib=20 * 1024, temp_c=temp, hotspot_c=temp + 12,
                  power_w=430.0, sm_clock_mhz=2520 if not throttled else 1800,
                  throttle_mask=0x20 if throttled else 0,
                  throttle_reasons=["sw thermal slowdown"] if throttled else [])
    h = HostSample(mem_available_mib=48 * 1024, swap_used_mib=0, trainer_rss_mib=9 * 1024,
                   disk_free_gib=812.5)
    return Sample(t=t, gpus=[g], host=h)


def _accumulate(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_read_back(tmp_path: Path) -> None:
    logdir = system_logdir(tmp_path / "out")
    assert logdir == tmp_path / "out" / "tensorboard" / "system"
    tb = TelemetryTB(logdir)
    t0 = 1_767_225_600.0
    tb.add_sample(_sample(t0, 60.0), None)  # before the first step: a sample counter
    tb.add_sample(_sample(t0 + 1, 70.0), 5)
    tb.add_sample(_sample(t0 + 2, 88.0, throttled=True), 6)
    tb.add_event(Event(t=t0 + 2.5, kind="guard", level="warning", guard="thermal",
                       message="GPU 0 is thermally throttled", attempt=1))
    tb.add_event(Event(t=t0 + 3, kind="relaunch", level="warning", message="CUDA OOM; relaunching"))
    tb.close()
    tb.close()  # twice is fine
    tb.add_sample(_sample(t0 + 4, 50.0), 7)  # after close: ignored, no new file

    acc = _accumulate(logdir)
    tags = set(acc.Tags()["scalars"])
    for tag in ("system/gpu0/temp_c", "system/gpu0/hotspot_c", "system/gpu0/util_pct",
                "system/gpu0/power_w", "system/gpu0/mem_used_gib", "system/gpu0/sm_clock_mhz",
                "system/gpu0/throttle", "host/mem_available_gib", "host/swap_used_gib",
                "host/trainer_rss_gib", "host/disk_free_gib", "events/relaunch",
                "events/guard/thermal", "events/throttle"):
        assert tag in tags, tag
    temps = acc.Scalars("system/gpu0/temp_c")
    assert [(e.step, e.value) for e in temps] == [(0, 60.0), (5, 70.0), (6, 88.0)]
    assert temps[1].wall_time == pytest.approx(t0 + 1)
    assert [e.value for e in acc.Scalars("system/gpu0/throttle")] == [0.0, 0.0, 1.0]
    assert acc.Scalars("system/gpu0/mem_used_gib")[0].value == pytest.approx(20.0)
    assert acc.Scalars("host/trainer_rss_gib")[0].value == pytest.approx(9.0)
    assert acc.Scalars("events/relaunch")[0].step == 6  # the last known training step
    assert "events/log" in acc.Tags()["tensors"]
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("events/log")]
    assert any("throttling: sw thermal slowdown" in t for t in texts)
    assert len(list(logdir.iterdir())) == 1


def test_missing_sensors_are_skipped_and_no_gpu(tmp_path: Path) -> None:
    tb = TelemetryTB(tmp_path / "tb")
    tb.add_sample(Sample(t=1.0, gpus=[], host=HostSample(mem_available_mib=1024)), 1)
    tb.add_sample(Sample(t=2.0, gpus=[GpuSample(index=1, temp_c=None, util_pct=float("nan"))]), 2)
    tb.close()
    acc = _accumulate(tmp_path / "tb")
    assert acc.Tags()["scalars"] == ["host/mem_available_gib"]


def test_write_failure_disables_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    tb = TelemetryTB(blocker / "tb")  # a file where a folder must go: mkdir fails
    for i in range(3):
        tb.add_sample(_sample(float(i), 50.0), i)
    tb.add_event(Event(t=5.0, kind="relaunch", message="x"))
    tb.close()
    assert tb.disabled and tb.error
    assert sum("TensorBoard telemetry disabled" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_disables(tmp_path: Path) -> None:
    tb = TelemetryTB(tmp_path / "tb")
    tb.add_sample(_sample(1.0, 50.0), 1)
    tb._file.close()
    tb._file = open("/dev/full", "ab")  # every flush now fails with ENOSPC
    tb._writer._writer = tb._file
    tb.add_sample(_sample(2.0, 50.0), 2)
    assert tb.disabled and "No space left" in (tb.error or "")
    tb.add_sample(_sample(3.0, 50.0), 3)
    tb.close()


def test_throttle_reasons() -> None:
    assert throttle_reasons(GpuSample(index=0, throttle_reasons=["gpu idle"])) == []
    assert throttle_reasons({"throttle_reasons": ["SwPowerCap"]}) == ["SwPowerCap"]
    assert throttle_reasons({"throttle_reasons": ["HwSlowdown"]}) == ["HwSlowdown"]
    assert throttle_reasons({"throttle_mask": 0x40}) == ["mask 0x40"]
    assert throttle_reasons({"throttle_mask": 0x1}) == []



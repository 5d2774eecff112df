"""CUDA_VISIBLE_DEVICES onto the real driver's devices (#14 item 2): the index, the UUID, a UUID
prefix and a hidden GPU, as NVML and CUDA see them on this box. (Every rule on FakeNVML with
several GPUs and MIG: tests/unit/test_reliability_machines.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from supervisor.telemetry.nvml import Nvml
from supervisor.telemetry.sampler import Sampler
from supervisor.telemetry.visible import resolve_ordered


def test_visible_devices_map_to_the_real_gpus_and_mark_this_run() -> None:
    nv = Nvml()
    try:
        assert nv.open() == "ok"
        devices = nv.nvml_devices()
        uuid = devices[0].uuid
        assert uuid and uuid.upper().startswith("GPU-"), devices
        for cvd in ("0", uuid, uuid[:12], uuid[4:16]):
            assert resolve_ordered(cvd, devices) == [0], cvd
        assert resolve_ordered("", devices) == [] and resolve_ordered("-1", devices) == []
        s = Sampler(nv)
        s.set_visible(uuid)
        assert [g.this_run for g in s.sample(os.getpid(), "/tmp").gpus][:1] == [True]
        s.set_visible("")  # a trainer that sees no GPU: none of them is this run's
        assert not any(g.this_run for g in s.sample(os.getpid(), "/tmp").gpus)
    finally:
        nv.close()
    # CUDA itself agrees: the UUID prefix gives one device, and it is NVML's device 0
    code = ("import json, torch; p = torch.cuda.get_device_properties(0); "
            "print(json.dumps([torch.cuda.device_count(), str(p.uuid)]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CUDA_VISIBLE_DEVICES": uuid[:12]},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    count, cuda_uuid = json.loads(out.stdout.strip().splitlines()[-1])
    assert count == 1 and uuid.lower().endswith(cuda_uuid.lower().removeprefix("gpu-")), (count, cuda_uuid, uuid)

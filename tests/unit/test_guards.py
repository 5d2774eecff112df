"""Guards as tables: a history in, actions out. No I/O, no clock."""

from __future__ import annotations

import signal

import pytest

from supervisor.guards import (
    CaptureStacks,
    Fail,
    PruneCheckpoints,
    Relaunch,
    StopRun,
    Warn,
    Window,
    backoff_delay,
    classify_exit,
    decide_relaunch,
    divergence,
    host_ram,
    prelaunch_host_ram,
    restarts_after,
    retention,
    run_guards,
    stall,
    thermal,
    utilisation,
)
from supervisor.guards.classify import (
    COMPLETED,
    CONFIG_ERROR,
    CRASH,
    CUDA_OOM,
    DISK_FULL,
    GPU_LOST,
    HOST_OOM_KILL,
    STOPPED,
)
from supervisor.recipe import (
    CheckpointGuard,
    CrashGuard,
    DivergenceGuard,
    Guards,
    HostRamGuard,
    Recipe,
    StallGuard,
    ThermalGuard,
    UtilisationGuard,
)
from supervisor.records import GpuSample, HostSample, Sample, Step
from supervisor.states import RunState

GIB = 1 << 30
T0 = 1_800_000_000.0  # wall seconds; the guards only ever see these numbers


def gpu(**kw) -> GpuSample:
    base = dict(index=0, util_pct=98.0, temp_c=70.0, margin_c=20.0)
    base.update(kw)
    return GpuSample(**base)


def sample(t: float, gpus=None, **host) -> Sample:
    return Sample(t=T0 + t, gpus=[gpu()] if gpus is None else gpus, host=HostSample(**host))


def step(t: float, n: int, loss=1.0, grad_norm=0.5, tps=None, attempt=1) -> Step:
    return Step(t=T0 + t, step=n, loss=loss, grad_norm=grad_norm, tokens_per_s=tps, attempt=attempt)


def ckpt(step_: int, complete=True, size=GIB, **kw) -> dict:
    return dict(name=f"checkpoint-{step_}", step=step_, complete=complete, size_bytes=size,
                path=f"/runs/out/checkpoint-{step_}", **kw)


def win(now: float, **kw) -> Window:
    kw.setdefault("state", RunState.TRAINING)
    kw.setdefault("phase", "training")
    kw.setdefault("phase_since", T0 - 3600)
    return Window(now=T0 + now, **kw)


def recipe(**over) -> Recipe:
    data = dict(model={"name": "m"}, data={"path": "/d.jsonl"},
                train={"output_dir": "out", "max_seq_len": 2048, "per_device_batch": 8, "grad_accum": 2})
    data.update(over)
    return Recipe.model_validate(data)


def only(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


# ---------------------------------------------------------------------------- thermal

TH = ThermalGuard()


@pytest.mark.parametrize("gpus_over_time, key", [
    # margin under 5 C
    ([[gpu(margin_c=12)], [gpu(margin_c=3.0, temp_c=86)]], "thermal:margin:0"),
    # thermal slowdown bit in the mask
    ([[gpu()], [gpu(throttle_mask=0x20)]], "thermal:throttle:0"),
    # reason word only
    ([[gpu()], [gpu(throttle_reasons=["hw_thermal_slowdown"])]], "thermal:throttle:0"),
    # a throttle shorter than the sampling interval: only the cumulative counter rose
    ([[gpu(throttle_counters={"sw_thermal": 10})], [gpu(throttle_counters={"sw_thermal": 5_000_010})]],
     "thermal:throttle:0"),
    # hotspot where the driver reports it
    ([[gpu()], [gpu(hotspot_c=104.0)]], "thermal:hotspot:0"),
])
def test_thermal_fires(gpus_over_time, key):
    w = win(20, samples=[sample(10 * i, g) for i, g in enumerate(gpus_over_time)])
    acts = thermal.check(w, TH)
    assert [a.key for a in acts] == [key]
    assert acts[0].evidence["gpu"] == 0


@pytest.mark.parametrize("samples", [
    [],  # no samples at all
    [sample(0, gpus=[]), sample(1, gpus=[])],  # NVML unavailable: samples without GPUs
    [sample(0), sample(1)],  # cool and unthrottled
    [sample(0, [gpu(throttle_mask=0x4)])],  # power cap is not thermal
    [sample(0, [gpu(throttle_counters={"sw_thermal": 7})]), sample(1, [gpu(throttle_counters={"sw_thermal": 7})])],
    [sample(0, [gpu(margin_c=1, lost=True)])],  # a lost GPU is the classifier's business
])
def test_thermal_quiet(samples):
    assert thermal.check(win(2, samples=samples), TH) == []


def test_thermal_tokens_per_s_evidence():
    samples = [sample(t, [gpu()]) for t in (0, 10, 20)] + [sample(t, [gpu(throttle_mask=0x40)]) for t in (30, 40)]
    steps = [step(t, i, tps=5900) for i, t in enumerate((5, 15, 25))] + [step(35, 4, tps=4840), step(45, 5, tps=4840)]
    acts = thermal.check(win(45, samples=samples, steps=steps), TH)
    assert "tokens/s fell 18 % (5,900 -> 4,840) while throttled" in acts[0].message
    assert acts[0].evidence["tokens_per_s_before"] == 5900


def test_thermal_not_repeated():
    w = win(1, samples=[sample(0, [gpu(margin_c=2)])], already_fired={"thermal:margin:0"})
    assert thermal.check(w, TH) == []


def test_no_action_touches_clocks():
    w = win(1, samples=[sample(0, [gpu(margin_c=0, throttle_mask=0x60, hotspot_c=120)])])
    assert all(isinstance(a, Warn) for a in thermal.check(w, TH))


# ---------------------------------------------------------------------------- host RAM

HR = HostRamGuard()


@pytest.mark.parametrize("hosts, keys", [
    ([dict(mem_available_mib=3000)], ["host_ram:low"]),
    ([dict(mem_available_mib=64000, cgroup_limit_mib=32000, cgroup_used_mib=30000)], ["host_ram:low"]),
    ([dict(mem_available_mib=64000, swap_used_mib=100), dict(mem_available_mib=64000, swap_used_mib=900)],
     ["host_ram:swap"]),
    ([dict(mem_available_mib=64000, swap_used_mib=100), dict(mem_available_mib=64000, swap_used_mib=500)], []),
    ([dict(mem_available_mib=64000)], []),
    ([dict()], []),  # psutil unavailable: nothing to say
])
def test_host_ram(hosts, keys):
    w = win(len(hosts), samples=[sample(i, **h) for i, h in enumerate(hosts)])
    assert [a.key for a in host_ram.check(w, HR)] == keys


def test_host_ram_cgroup_is_smaller_and_named():
    w = win(1, samples=[sample(0, mem_available_mib=64000, cgroup_limit_mib=16000, cgroup_used_mib=14000)])
    (a,) = host_ram.check(w, HR)
    assert a.evidence["available_mib"] == 2000 and "cgroup" in a.message


def test_prelaunch_host_ram():
    assert prelaunch_host_ram(64 * GIB, 20 * GIB, HR) == []
    (a,) = prelaunch_host_ram(22 * GIB, 20 * GIB, HR)
    assert a.evidence["left_bytes"] == 2 * GIB and "20.0 GB" in a.message
    assert prelaunch_host_ram(None, 20 * GIB, HR) == []


# ---------------------------------------------------------------------------- utilisation

UT = UtilisationGuard(threshold_pct=90, window_s=300)


def util_history(util=40.0, uvm=None, pcie=0.0, cpu=20.0, span=300, every=30):
    out = []
    for i, t in enumerate(range(0, span + 1, every)):
        g = gpu(util_pct=util, pcie_rx_kbs=pcie, pcie_tx_kbs=pcie)
        out.append(sample(t, [g], cpu_pct=cpu, trainer_uvm_mib=None if uvm is None else uvm + 50 * i))
    return out


EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.parametrize("samples, env, cause", [
    (util_history(uvm=1000, pcie=2_000_000), EXPANDABLE, "paged_eviction"),
    (util_history(), {}, "no_expandable_segments"),
    (util_history(), {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "no_expandable_segments"),
    (util_history(cpu=97), EXPANDABLE, "cpu_bound"),
    (util_history(), EXPANDABLE, "small_batch"),
    (util_history(), {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, "small_batch"),
])
def test_utilisation_cause(samples, env, cause):
    acts = utilisation.check(win(300, samples=samples, env=env), UT)
    assert len(acts) == 1 and acts[0].evidence["cause"] == cause
    assert acts[0].evidence["gpu_util_mean_pct"] == 40.0


@pytest.mark.parametrize("kw", [
    dict(samples=util_history(util=97)),  # busy
    dict(samples=util_history(span=120)),  # samples do not span the window
    dict(samples=util_history(), phase="loading_model"),  # not training
    dict(samples=util_history(), phase_since=T0 + 100),  # training for less than window_s
])
def test_utilisation_quiet(kw):
    assert utilisation.check(win(300, **kw), UT) == []


# ---------------------------------------------------------------------------- divergence

DV = DivergenceGuard(nan_consecutive=3, spike_factor=4.0, spike_window=5)
NAN, INF = float("nan"), float("inf")


def losses(values, start=101, grad=None):
    return [step(i, start + i, loss=v, grad_norm=(grad[i] if grad else 0.5)) for i, v in enumerate(values)]


def test_nan_three_times_diverged_naming_checkpoint_before():
    steps = [step(i, 100 + 5 * i) for i in range(4)] + [step(10 + i, 120 + 5 * i, loss=NAN) for i in range(3)]
    cks = [ckpt(50), ckpt(100), ckpt(120)]  # 120 was saved after the NaN update: not a resume point
    (a,) = divergence.check(win(20, steps=steps, checkpoints=cks), DV)
    assert isinstance(a, StopRun) and a.state is RunState.DIVERGED and not a.graceful
    assert "resume from checkpoint-100 (before the NaN at step 120)" in a.message
    assert a.resume_hint == "/runs/out/checkpoint-100" and a.evidence["first_bad_step"] == 120


@pytest.mark.parametrize("values, grads, fires", [
    ([1, NAN, NAN], None, False),  # two in a row: not yet
    ([NAN, NAN, 1, NAN, NAN], None, False),  # broken runs
    ([1, NAN, INF, NAN], None, True),
    ([0.0, 0.0, 0.0], [NAN, NAN, NAN], True),  # logged loss 0.0 with NaN grad_norm (E6)
    ([1, 1, 1], None, False),
])
def test_nan_runs(values, grads, fires):
    acts = divergence.check(win(10, steps=losses(values, grad=grads)), DV)
    assert bool(acts) is fires


def test_spike_diverged():
    steps = losses([2.0, 2.1, 1.9, 2.0, 2.05, 9.0])
    (a,) = divergence.check(win(10, steps=steps, checkpoints=[ckpt(100), ckpt(106)]), DV)
    assert a.state is RunState.DIVERGED and a.evidence["step"] == 106
    assert "checkpoint-100 (before the spike at step 106)" in a.message


def test_spike_needs_history_and_factor():
    assert divergence.check(win(10, steps=losses([2.0, 9.0, 2.0])), DV) == []  # too little history
    assert divergence.check(win(10, steps=losses([2.0] * 5 + [7.9])), DV) == []  # 3.95x < 4x


def test_divergence_ignores_earlier_attempt_and_never_relaunches():
    old = [step(i, 120 + i, loss=NAN, attempt=1) for i in range(3)]
    assert divergence.check(win(10, steps=old, attempt=2), DV) == []
    acts = divergence.check(win(10, steps=losses([NAN] * 3)), DV)
    assert not only(acts, Relaunch)
    assert "no complete checkpoint before step 101" in acts[0].message


# ---------------------------------------------------------------------------- stall

ST = StallGuard(step_factor=10, floor_s=600, loading_s=3600, saving_s=1800)


def steady_steps(n=10, every=5.0):
    return [step(i * every, i) for i in range(n)]


@pytest.mark.parametrize("now, phase, since, steps, fires", [
    (45 + 599, "training", -100, steady_steps(), False),  # median 5 s x 10 = 50 s < floor 600
    (45 + 601, "training", -100, steady_steps(), True),
    (45 + 1000, "training", -100, steady_steps(every=90)[:1] + [step(90, 1), step(180, 2)], False),  # 900 s limit
    (180 + 901, "training", -100, [step(0, 0), step(90, 1), step(180, 2)], True),
    (601, "training", 0, [], True),  # training began, no step at all
    (3000, "loading_model", 0, [], False),  # loading is slow by nature
    (3601, "loading_model", 0, [], True),
    (3601, "tokenising", 0, [], True),
    (1801, "saving", 0, steady_steps(), True),
    (1799, "saving", 0, steady_steps(), False),
    (99999, "finished", 0, [], False),
])
def test_stall(now, phase, since, steps, fires):
    w = win(now, phase=phase, phase_since=T0 + since, steps=steps, checkpoints=[ckpt(100), ckpt(200, complete=False)])
    acts = stall.check(w, ST)
    if not fires:
        assert acts == []
        return
    cap, rel = acts
    assert isinstance(cap, CaptureStacks) and isinstance(rel, Relaunch)
    assert rel.reason == "stall" and rel.rung is None and rel.resume_from == "/runs/out/checkpoint-100"
    assert stall.check(win(now, phase=phase, phase_since=T0 + since, steps=steps, rung=1), ST)[1].rung == 1
    assert rel.evidence["idle_s"] > rel.evidence["limit_s"]


def test_stall_before_any_phase_event_uses_launch_time():
    w = win(3601, phase=None, phase_since=None, attempt_started_t=T0, state=RunState.STARTING)
    assert only(stall.check(w, ST), Relaunch)


def test_stall_spends_restart_budget():
    w = win(2000, steps=steady_steps(), restarts_since_progress=3)
    acts = stall.check(w, ST, CrashGuard(max_restarts=3))
    assert only(acts, Fail) and not only(acts, Relaunch)
    acts = stall.check(win(2000, steps=steady_steps(), restarts_since_progress=1), ST, CrashGuard())
    assert only(acts, Relaunch)[0].delay_s == 20.0


# ---------------------------------------------------------------------------- checkpoints / disk

CK = CheckpointGuard(disk_headroom_factor=2.0, min_free_gib=1.0)


def test_prune_beyond_keep():
    cks = [ckpt(s) for s in (100, 200, 300, 400, 500)] + [ckpt(550, complete=False)]
    (a,) = retention.check(win(0, checkpoints=cks, keep_checkpoints=3), CK)
    assert isinstance(a, PruneCheckpoints) and a.names == ["checkpoint-100", "checkpoint-200"]
    assert a.evidence["frees_bytes"] == 2 * GIB


def test_prune_keeps_best():
    cks = [ckpt(100), ckpt(200), ckpt(300), ckpt(400, best_checkpoint="checkpoint-100")]
    (a,) = retention.check(win(0, checkpoints=cks, keep_checkpoints=2), CK)
    assert a.names == ["checkpoint-200", "checkpoint-300"]


@pytest.mark.parametrize("free_gib, kind", [
    (10.0, None),
    (3.5, Warn),  # under 2 x 2 GB
    (2.9, StopRun),  # under 2 GB + 1 GB margin: stop while the final save still fits
])
def test_disk(free_gib, kind):
    w = win(0, checkpoints=[ckpt(100, size=2 * GIB)], disk_free_bytes=int(free_gib * GIB))
    acts = retention.check(w, CK)
    if kind is None:
        assert acts == []
        return
    (a,) = acts
    assert isinstance(a, kind)
    if kind is StopRun:
        assert a.graceful and a.state is RunState.STOPPED
        assert a.message.startswith("stopping before the disk fills: 2.9 GB free, next checkpoint needs ~2.0 GB")


def test_disk_counts_what_the_prune_frees():
    cks = [ckpt(s, size=2 * GIB) for s in (100, 200, 300, 400)]
    acts = retention.check(win(0, checkpoints=cks, keep_checkpoints=3, disk_free_bytes=int(1.8 * GIB)), CK)
    assert [type(a) for a in acts] == [PruneCheckpoints, Warn]  # 3.8 GB after prune: warn, no stop


def test_disk_stop_not_repeated_after_run_ends():
    w = win(0, checkpoints=[ckpt(100, size=2 * GIB)], disk_free_bytes=GIB, state=RunState.STOPPING)
    assert retention.check(w, CK) == []


# ---------------------------------------------------------------------------- run_guards


def test_run_guards_keeps_the_most_severe_decision():
    steps = steady_steps() + [step(50 + i, 10 + i, loss=NAN) for i in range(3)]
    w = win(2000, steps=steps, checkpoints=[ckpt(5, size=2 * GIB)], disk_free_bytes=GIB)
    acts = run_guards(w, Guards())
    decisive = [a for a in acts if isinstance(a, (Fail, StopRun, Relaunch))]
    assert len(decisive) == 1 and decisive[0].state is RunState.DIVERGED
    assert only(acts, CaptureStacks)  # the stall's stacks are still worth having


def test_run_guards_respects_enabled_and_state():
    w = win(1, samples=[sample(0, [gpu(margin_c=1)])], phase_since=T0)
    assert [type(a) for a in run_guards(w, Guards())] == [Warn]
    assert run_guards(w, Guards.model_validate({"thermal": {"enabled": False}})) == []
    w.state = RunState.COMPLETED
    assert run_guards(w, Guards()) == []


# ---------------------------------------------------------------------------- classify

OOM_TB = [
    "  0%|          | 0/100 [00:00<?, ?it/s]",
    "Traceback (most recent call last):",
    '  File "/x/train.py", line 10, in <module>',
    "    trainer.train()",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
    "capacity of 23.99 GiB of which 1.1 GiB is free. 24.00 GiB allowed;",
]


@pytest.mark.parametrize("args, kind", [
    (dict(returncode=1, stderr_tail=OOM_TB), CUDA_OOM),
    (dict(returncode=1, stderr_tail=OOM_TB[:-1] + ["torch.cuda.OutOfMemoryError: CUDA out of memory."]), CUDA_OOM),
    (dict(returncode=1, stderr_tail=["Traceback (most recent call last):", "  File x",
                                     "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"]),
     CUDA_OOM),
    (dict(returncode=1, stderr_tail=["step 5", "Error out of memory at line 88 in file /src/csrc/ops.cu"]), CUDA_OOM),
    (dict(returncode=1, stderr_tail=["Error an illegal memory access was encountered at line 88 in file /src/ops.cu"]),
     CRASH),
    # printed as data, clean exit: not an OOM
    (dict(returncode=0, stderr_tail=["sample text: CUDA out of memory", "torch.OutOfMemoryError: x"]), COMPLETED),
    # OOM in an earlier, handled traceback; the final one is something else
    (dict(returncode=1, stderr_tail=OOM_TB + ["", "Traceback (most recent call last):", "ValueError: bad"]), CRASH),
    (dict(returncode=-9, stderr_tail=["step 10"]), HOST_OOM_KILL),
    (dict(returncode=137, stderr_tail=[]), HOST_OOM_KILL),
    (dict(returncode=None, signal=9, stderr_tail=[], oom_kill_delta=1), HOST_OOM_KILL),
    (dict(returncode=-11, stderr_tail=[]), CRASH),
    (dict(returncode=1, stderr_tail=["Traceback (most recent call last):",
                                     "OSError: [Errno 28] No space left on device: '/out/checkpoint-5/optimizer.pt'"]),
     DISK_FULL),
    (dict(returncode=1, stderr_tail=["Traceback (most recent call last):",
                                     "RuntimeError: [enforce fail at inline_container.cc:603] . "
                                     "PytorchStreamWriter failed writing file data/3: file write failed"]), DISK_FULL),
    (dict(returncode=1, stderr_tail=["Traceback (most recent call last):",
                                     "FileNotFoundError: [Errno 2] No such file or directory: '/data/train.jsonl'"]),
     CONFIG_ERROR),
    (dict(returncode=1, stderr_tail=["Traceback (most recent call last):",
                                     "ModuleNotFoundError: No module named 'peft'"]), CONFIG_ERROR),
    (dict(returncode=127, stderr_tail=["exec failed: /venv/bin/python: No such file or directory"]), CONFIG_ERROR),
    (dict(returncode=1, stderr_tail=["Traceback (most recent call last):", "KeyError: 'input_ids'"]), CRASH),
    (dict(returncode=1, stderr_tail=[]), CRASH),
    (dict(returncode=1, stderr_tail=OOM_TB, gpu_lost=True), GPU_LOST),
    (dict(returncode=-15, stderr_tail=[], stop_requested=True), STOPPED),
    (dict(returncode=1, stderr_tail=["Traceback (most recent call last):",
                                     "RuntimeError: DataLoader worker (pid 77) is killed by signal: Killed."],
          oom_kill_delta=2), HOST_OOM_KILL),
])
def test_classify(args, kind):
    args.setdefault("signal", None)
    assert classify_exit(**args).kind == kind


def test_classify_spawn_error_and_describe():
    ec = classify_exit(None, None, [], spawn_error="exec /venv/bin/python: ENOENT")
    assert ec.kind == CONFIG_ERROR and not ec.retryable
    assert ec.describe() == "config_error: could not start the trainer: exec /venv/bin/python: ENOENT"


def test_classify_host_oom_confirmation_and_summary():
    un = classify_exit(-9, None, ["loading"], oom_kill_delta=None)  # /proc/vmstat unreadable
    assert un.kind == HOST_OOM_KILL and un.confirmed is False and "possible host OOM" in un.summary
    moved_not = classify_exit(-9, None, ["loading"], oom_kill_delta=0)  # issue #14: not an OOM
    assert moved_not.kind == CRASH and moved_not.summary == "killed by signal 9" and moved_not.retryable
    yes = classify_exit(-9, None, [], oom_kill_delta=1)
    assert yes.confirmed is True and "OOM killer" in yes.summary
    assert classify_exit(-signal.SIGKILL, None, []).retryable


# ---------------------------------------------------------------------------- relaunch decisions

R = recipe()  # default ladder: seq 768 (resumable), r 8 (fresh), q/v only (fresh)
OOM = classify_exit(1, None, OOM_TB)
CRASHED = classify_exit(1, None, ["Traceback (most recent call last):", "RuntimeError: boom"])
CKS = [ckpt(50), ckpt(100), ckpt(120, complete=False)]


# Rungs as ladder.py numbers them: None = the recipe as written, n = oom_ladder[0..n-1] applied.


def test_oom_base_to_rung1_resumes():
    (a,) = decide_relaunch(OOM, win(0, rung=None, checkpoints=CKS), R)
    assert isinstance(a, Relaunch) and a.rung == 1 and not a.fresh_output
    assert a.resume_from == "/runs/out/checkpoint-100" and a.delay_s == 0
    assert "max_seq_len 2048 -> 768" in a.message


def test_oom_before_first_checkpoint_starts_from_scratch():
    (a,) = decide_relaunch(OOM, win(0, rung=None, checkpoints=[ckpt(10, complete=False)]), R)
    assert a.rung == 1 and a.resume_from is None and not a.fresh_output


def test_oom_rung1_to_rung2_fresh():
    (a,) = decide_relaunch(OOM, win(0, rung=1, checkpoints=CKS), R)
    assert a.rung == 2 and a.fresh_output and a.resume_from is None
    assert "r 16 -> 8" in a.message


def test_oom_rung2_to_rung3_fresh():
    (a,) = decide_relaunch(OOM, win(0, rung=2, checkpoints=CKS), R)
    assert a.rung == 3 and a.fresh_output and "target_modules all-linear -> q_proj,v_proj" in a.message


def test_oom_after_a_fresh_rung_resumes_again_when_shapes_stay():
    r = recipe(oom_ladder=[{"lora.r": 8}, {"train.max_seq_len": 512}])
    (a,) = decide_relaunch(OOM, win(0, rung=1, checkpoints=CKS), r)
    assert a.rung == 2 and not a.fresh_output and a.resume_from == "/runs/out/checkpoint-100"


def test_oom_last_rung_fails():
    (a,) = decide_relaunch(OOM, win(0, rung=3, checkpoints=CKS), R)
    assert isinstance(a, Fail) and a.message.startswith("CUDA OOM at minimum settings (rung 3)")  # oom_ladder[2]: the third change
    (a,) = decide_relaunch(OOM, win(0, checkpoints=CKS), recipe(oom_ladder=[]))
    assert isinstance(a, Fail) and "minimum settings (the recipe as written)" in a.message


def test_oom_relaunch_names_the_rung_as_a_user_counts_it():
    (a,) = decide_relaunch(OOM, win(0, checkpoints=CKS), R)
    assert a.rung == 1 and "relaunching at rung 1 (max_seq_len" in a.message
    (a,) = decide_relaunch(OOM, win(0, rung=1, checkpoints=CKS), R)
    assert a.message.startswith("CUDA OOM at rung 1; relaunching at rung 2")


def test_oom_ladder_disabled_fails():
    r = recipe(guards={"oom": {"enabled": False}})
    assert isinstance(decide_relaunch(OOM, win(0), r)[0], Fail)


def test_ladder_keeps_effective_batch():
    from supervisor import ladder

    r = recipe(oom_ladder=[{"train.per_device_batch": 4}, {"train.max_seq_len": 512}])
    assert [ladder.effective(r, k).train.effective_batch for k in (None, 1, 2)] == [16, 16, 16]
    assert ladder.effective(r, 2).train.max_seq_len == 512 and ladder.effective(r, 2).train.grad_accum == 4


@pytest.mark.parametrize("restarts, delay", [(0, 10.0), (1, 20.0), (2, 40.0)])
def test_crash_backoff(restarts, delay):
    (a,) = decide_relaunch(CRASHED, win(0, restarts_since_progress=restarts, checkpoints=CKS, rung=1), R)
    assert isinstance(a, Relaunch) and a.delay_s == delay and a.rung == 1  # same rung
    assert a.resume_from == "/runs/out/checkpoint-100"


def test_backoff_is_capped():
    assert backoff_delay(10, CrashGuard(backoff_base_s=10, backoff_max_s=600)) == 600


def test_crash_loop_fails_with_stderr():
    (a,) = decide_relaunch(CRASHED, win(0, restarts_since_progress=3, checkpoints=CKS), R)
    assert isinstance(a, Fail) and "crash loop" in a.message and "RuntimeError: boom" in a.message


def test_budget_resets_after_progress():
    # 3 restarts, then the attempt wrote a new complete checkpoint and crashed: the budget is full again.
    r = restarts_after(3, "progress")
    assert r == 0
    (a,) = decide_relaunch(CRASHED, win(0, restarts_since_progress=r, checkpoints=CKS), R)
    assert isinstance(a, Relaunch) and a.delay_s == 10.0
    assert restarts_after(3, "resume") == 0  # `qlora-watch resume`: a person asked


def test_budget_counts_relaunches_at_the_same_rung_only():
    assert restarts_after(2, "relaunch", rung_before=None, rung_after=None) == 3  # a crash, as written
    assert restarts_after(2, "relaunch", rung_before=1, rung_after=1) == 3  # a stall at rung 1
    assert restarts_after(2, "relaunch", rung_before=None, rung_after=1) == 2  # down the ladder


def test_host_oom_kill_relaunches_like_a_crash():
    (a,) = decide_relaunch(classify_exit(-9, None, []), win(0, checkpoints=CKS), R)
    assert isinstance(a, Relaunch) and a.reason == HOST_OOM_KILL and "possible host OOM" in a.message


@pytest.mark.parametrize("ec", [
    classify_exit(1, None, ["Traceback (most recent call last):", "FileNotFoundError: /data"]),
    classify_exit(1, None, ["Traceback (most recent call last):", "OSError: [Errno 28] No space left on device"]),
    classify_exit(1, None, [], gpu_lost=True),
])
def test_not_retryable_fails_and_keeps_checkpoints(ec):
    (a,) = decide_relaunch(ec, win(0, checkpoints=CKS), R)
    assert isinstance(a, Fail) and a.message.startswith(ec.kind) and "checkpoint-100" in a.message


def test_completed_and_stopped_do_nothing():
    assert decide_relaunch(classify_exit(0, None, []), win(0), R) == []
    assert decide_relaunch(classify_exit(-15, None, [], stop_requested=True), win(0), R) == []


def test_relaunch_prefers_this_runs_checkpoints():
    cks = [ckpt(100, run_id="me"), ckpt(5000, run_id="stale-run")]
    (a,) = decide_relaunch(CRASHED, win(0, checkpoints=cks, run_id="me"), R)
    assert a.resume_from == "/runs/out/checkpoint-100"


def test_window_built_on_the_core_side(tmp_path):
    from supervisor.daemon.guard_window import GuardClock, build_window
    from supervisor.status import RunStatus
    from tests.support import make_ckpt

    out = tmp_path / "out"
    make_ckpt(out, 100)
    st = RunStatus.from_json({"state": "training", "phase": "training", "phase_since": T0, "attempt": 2,
                              "rung": 1, "restarts_since_progress": 1, "launched_at": T0, "last_progress_t": T0})
    w = build_window(status=st, recipe=recipe(env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
                     samples=[sample(0, disk_free_gib=50.0)], steps=[step(1, 5, attempt=2)],
                     output_dir=out, clock=GuardClock(), run_id="r1", fired={"x"})
    assert w.state == RunState.TRAINING
    assert (w.attempt, w.rung, w.restarts_since_progress, w.run_id) == (2, 1, 1, "r1")
    assert [i.name for i in w.infos()] == ["checkpoint-100"] and w.infos()[0].path.name == "checkpoint-100"
    assert w.disk_free_bytes == 50 * GIB and w.keep_checkpoints == 3 and w.already_fired == {"x"}
    assert w.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and w.now >= T0
    run_guards(w, Guards())  # runs end to end on a real window

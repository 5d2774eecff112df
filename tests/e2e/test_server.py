"""The control socket with real sockets and real processes (RELIABILITY_PLAN H1-H6, E7)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from supervisor import paths
from supervisor import protocol as proto
from supervisor.control.client import AsyncRunClient, ServerClosed, request
from supervisor.daemon.server import AlreadyRunning, ControlServer, PeerInfo, ServerLimits
from supervisor.protocol import CommandError
from tests.support import ROOT, Raw, as_nobody, nobody_connect, own_socket_inodes, wait_for

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeHandler:
    """Stands in for the supervisor core."""

    def __init__(self, **series: list[Any]) -> None:
        self.series = {name: series.get(name, []) for name in proto.SERIES}
        self.calls: list[tuple[str, dict[str, Any], PeerInfo]] = []

    def snapshot(self) -> dict[str, Any]:
        return {"run": {"id": "r1", "recipe": "tiny"}, "state": "training", **self.series}

    async def handle_command(
        self, cmd: str, args: dict[str, Any], peer: PeerInfo
    ) -> dict[str, Any]:
        self.calls.append((cmd, args, peer))
        if cmd == "stop_now":
            raise CommandError("trainer not running")
        if cmd == "stop" and args.get("boom"):
            raise RuntimeError("bug")
        await asyncio.sleep(0)
        return {"cmd": cmd, "args": args}


class ServerThread:
    """A ControlServer in its own event loop thread, driven from the test thread."""

    def __init__(self, path: Path, handler: Any, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.handler = handler
        self.server = ControlServer(path, handler, limits=ServerLimits(**kwargs))
        self.call(self.server.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def do(self, fn: Callable[..., T], *args: Any) -> T:
        async def run() -> T:
            return fn(*args)

        return self.call(run())

    def broadcast(self, *msgs: dict[str, Any]) -> None:
        self.do(lambda: [self.server.broadcast(m) for m in msgs])

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def handler() -> FakeHandler:
    return FakeHandler(
        samples=[{"t": 1.0, "nvml": "ok"}],
        steps=[{"t": 1.0, "step": 1, "loss": 2.0}],
        events=[{"t": 1.0, "kind": "phase", "id": 1}],
        log=["loading model"],
    )


@pytest.fixture
def srv(home: Path, handler: FakeHandler) -> Iterator[ServerThread]:
    st = ServerThread(paths.socket_path("r1"), handler, handshake_timeout=5.0)
    yield st
    st.stop()


LIVE = [
    proto.sample({"t": 2.0, "gpus": []}),
    proto.step({"step": 2, "loss": float("nan")}),
    proto.event({"kind": "guard", "id": 2}),
    proto.log(["a", "b"]),
    proto.state("saving"),
    proto.acked([2]),
]


# ------------------------------------------------------------------------------ messages


def test_round_trip_of_every_message(srv: ServerThread, handler: FakeHandler) -> None:
    async def scenario() -> None:
        async with AsyncRunClient(srv.server.path) as client:
            snap = await client.connect()
            assert client.hello == {
                "type": "hello",
                "version": 1,
                "run_id": "r1",
                "server_pid": os.getpid(),
            }
            assert snap == handler.snapshot()
            it = client.messages()
            await asyncio.to_thread(srv.broadcast, *LIVE)
            got = [await it.__anext__() for _ in LIVE]
            assert got[1]["step"]["loss"] == "NaN"
            assert [m["type"] for m in got] == ["sample", "step", "event", "log", "state", "acked"]
            assert await client.send_command("ping") == {"pong": True}
            assert await client.send_command("status") == {"cmd": "status", "args": {}}
            assert await client.send_command("ack", event_ids=[1, 2]) == {
                "cmd": "ack",
                "args": {"event_ids": [1, 2]},
            }
            assert await client.send_command("ack") == {"cmd": "ack", "args": {}}
            with pytest.raises(CommandError, match="trainer not running"):
                await client.send_command("stop_now")
            with pytest.raises(CommandError, match="^unknown command$"):
                await client.send_command("rm -rf")
            with pytest.raises(CommandError, match="bad arguments"):
                await client.send_command("stop", boom=True)
            # Concurrent commands are matched to their replies by id.
            many = await asyncio.gather(
                *(client.send_command("ack", event_ids=[i]) for i in range(8))
            )
            assert [r["args"]["event_ids"] for r in many] == [[i] for i in range(8)]
            assert (
                handler.calls[0][2].uid == os.geteuid() and handler.calls[0][2].pid == os.getpid()
            )
            await asyncio.to_thread(srv.call, srv.server.close())
            rest = [m async for m in it]
            assert rest == [proto.bye("server shutting down")]
            with pytest.raises(ServerClosed):
                await client.send_command("ping")

    arun(scenario())
    assert not srv.server.path.exists()


def test_broadcast_bye_flushes_then_hangs_up(srv: ServerThread) -> None:
    async def scenario() -> None:
        async with AsyncRunClient(srv.server.path) as client:
            await client.connect()
            srv.broadcast(proto.reply(1, True), proto.snapshot_end())  # not live: dropped, no raise
            srv.broadcast(*LIVE, proto.bye("run completed"), LIVE[0])
            got = [m async for m in client.messages()]
            assert got[1]["step"]["loss"] == "NaN"
            assert [m["type"] for m in got] == [m["type"] for m in LIVE] + ["bye"]
            assert got[-1] == proto.bye("run completed")
            assert client.bye_reason == "run completed"
            with pytest.raises(ServerClosed, match="run completed"):
                await client.send_command("ping")
        assert srv.server.stats.dropped_broadcasts == 2
        await asyncio.to_thread(srv.call, srv.server.close())  # no second bye, nobody to wait for

    arun(scenario())


def test_history_false_and_series_limit(srv: ServerThread) -> None:
    async def scenario() -> None:
        async with AsyncRunClient(srv.server.path) as client:
            snap = await client.connect(history=False)
            assert snap["state"] == "training" and snap["samples"] == [] and snap["log"] == []
        async with AsyncRunClient(srv.server.path, series_limit=0) as client:
            assert (await client.connect())["steps"] == []

    arun(scenario())


def test_sync_request_and_unknown_command(srv: ServerThread) -> None:
    path = srv.server.path
    assert request(path, "status") == {"cmd": "status", "args": {}}
    assert request(path, "ack", event_ids=[3]) == {"cmd": "ack", "args": {"event_ids": [3]}}
    with pytest.raises(CommandError, match="unknown command"):
        request(path, "shutdown_host")
    with pytest.raises(CommandError, match="internal error"):  # handler bug: reply, no crash
        srv.server.handler.calls.clear()
        srv.server.handler.handle_command = lambda *a: (_ for _ in ()).throw(RuntimeError("bug"))
        request(path, "stop")
    assert request(path, "ping") == {"pong": True}


def test_two_clients_both_receive_broadcasts(srv: ServerThread) -> None:
    async def scenario() -> None:
        a, b = AsyncRunClient(srv.server.path), AsyncRunClient(srv.server.path)
        await a.connect()
        await b.connect()
        await asyncio.to_thread(srv.broadcast, *LIVE)
        for client in (a, b):
            it = client.messages()
            assert [(await it.__anext__())["type"] for _ in LIVE] == [m["type"] for m in LIVE]
        await a.close()
        await b.close()

    arun(scenario())


# ------------------------------------------------------------------------------ slow clients


def test_client_that_never_reads_is_dropped(home: Path) -> None:
    st = ServerThread(paths.socket_path("slow"), FakeHandler(), queue_messages=2000)
    slow = Raw(st.server.path)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.send(proto.attach(history=False))
    n, payload = 12_000, "x" * 1000

    async def scenario() -> tuple[int, float]:
        async with AsyncRunClient(st.server.path) as good:
            await good.connect()
            received = 0

            async def consume() -> None:
                nonlocal received
                async for msg in good.messages():
                    if msg["type"] == "log":
                        received += 1
                        if received == n:
                            return

            consumer = asyncio.create_task(consume())

            async def burst(lo: int) -> float:  # runs in the server's loop
                t0 = time.perf_counter()
                for i in range(lo, lo + 200):
                    st.server.broadcast(proto.log([f"{i} {payload}"]))
                return time.perf_counter() - t0

            worst = 0.0
            for lo in range(0, n, 200):
                worst = max(worst, await asyncio.to_thread(st.call, burst(lo)))
                await asyncio.sleep(0.005)
            await asyncio.wait_for(consumer, 30)
            return received, worst

    received, worst = arun(scenario())
    print(f"\nslowest burst of 200 broadcasts: {worst * 1000:.1f} ms")
    assert received == n  # the reading client lost nothing
    assert st.server.stats.dropped_slow == 1
    assert worst < 1.0  # never waits for a peer (loose: shared CI cores)
    slow.sock.settimeout(10)
    got = slow.until_closed()  # what was in flight, then EOF: the server hung up
    assert len(got) < n
    assert request(st.server.path, "ping") == {"pong": True}
    st.stop()


# ------------------------------------------------------------------------------ abuse


def half_frame(raw: Raw) -> None:
    raw.sock.sendall(proto.encode(proto.attach())[:7])
    raw.sock.shutdown(socket.SHUT_WR)


BAD_INPUTS: dict[str, Callable[[Raw], None]] = {
    "garbage": lambda r: r.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "4gib_prefix": lambda r: r.sock.sendall(b"\xff\xff\xff\xff" + b"A" * 1000),
    "half_frame_then_disconnect": half_frame,
    "invalid_utf8": lambda r: r.sock.sendall(proto.frame(b'{"type":"attach","x":"\xc3\x28"}')),
    "non_object_json": lambda r: r.sock.sendall(proto.frame(b"[1,2,3]")),
    "invalid_json": lambda r: r.sock.sendall(proto.frame(b'{"type": "attach",')),
    "unknown_type": lambda r: r.sock.sendall(proto.frame(b'{"type": "exec", "cmd": "id"}')),
    "oversize_command": lambda r: r.send(
        proto.command(1, "ack", {"event_ids": list(range(20000))})
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_closes_only_that_connection(srv: ServerThread, name: str) -> None:
    async def scenario() -> None:
        async with AsyncRunClient(srv.server.path) as good:
            await good.connect()
            bad = Raw(srv.server.path)
            assert bad.recv()["type"] == "hello"  # type: ignore[index]
            try:
                await asyncio.to_thread(BAD_INPUTS[name], bad)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server hung up before we finished sending: that is the point
            rest = await asyncio.to_thread(bad.until_closed)
            if name != "half_frame_then_disconnect":
                assert rest and rest[-1]["type"] == "bye" and "protocol error" in rest[-1]["reason"]
            bad.close()
            await asyncio.to_thread(srv.broadcast, LIVE[0])
            assert (await good.messages().__anext__())["type"] == "sample"
            assert await good.send_command("ping") == {"pong": True}

    arun(scenario())
    assert srv.server.stats.protocol_errors == 1
    wait_for(lambda: srv.server.client_count == 0, timeout=10, interval=0.02)  # the server sees the good client leave


def test_slowloris_and_silent_clients_time_out(home: Path) -> None:
    st = ServerThread(
        paths.socket_path("lor"), FakeHandler(), handshake_timeout=0.3, frame_timeout=0.3
    )
    silent = Raw(st.server.path)
    assert [m["type"] for m in silent.until_closed()] == ["hello", "bye"]
    trickle = Raw(st.server.path)
    trickle.send(proto.attach(history=False))
    trickle.sock.sendall(b"\x00\x00")  # half a header, then nothing
    msgs = trickle.until_closed()
    assert msgs[-1] == proto.bye("frame timeout")
    assert st.server.stats.timeouts == 2
    st.stop()


def test_200_concurrent_connects(home: Path) -> None:
    st = ServerThread(paths.socket_path("many"), FakeHandler(), max_clients=64)
    fds_before = psutil.Process().num_fds()
    barrier = threading.Barrier(200)

    def one(_: int) -> tuple[str, Raw]:
        barrier.wait()
        raw = Raw(st.server.path)
        first = raw.recv()
        return (first or {}).get("type", "eof") + ":" + str((first or {}).get("reason", "")), raw

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    kinds = sorted(k for k, _ in results)
    assert kinds.count("hello:") == 64
    assert kinds.count("bye:too many clients") == 136
    with pytest.raises(ServerClosed, match="too many clients"):
        request(st.server.path, "ping")
    for _, raw in results:
        raw.close()
    wait_for(lambda: st.server.client_count == 0, timeout=10, interval=0.02)
    assert st.server.stats.refused_full == 137
    assert request(st.server.path, "ping") == {"pong": True}
    time.sleep(1.5)  # abort timers of refused connections
    assert psutil.Process().num_fds() <= fds_before + 2
    st.stop()


# ------------------------------------------------------------------------------ security


def test_socket_mode_0600_in_0700_dir(srv: ServerThread) -> None:
    path = srv.server.path
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    dir_st = os.lstat(path.parent)
    assert stat.S_IMODE(dir_st.st_mode) == 0o700 and dir_st.st_uid == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges in a child")
def test_other_uid_is_refused_by_mode_then_by_peercred(
    home: Path, handler: FakeHandler, caplog: pytest.LogCaptureFixture
) -> None:
    home.mkdir(mode=0o711)  # traversable, so only our dir and socket modes decide
    home.chmod(0o711)
    st = ServerThread(paths.socket_path("perm"), handler)
    path = st.server.path
    assert as_nobody(nobody_connect(path)) == {"result": "EACCES"}  # H1: dir 0700
    path.parent.chmod(0o777)
    assert as_nobody(nobody_connect(path)) == {"result": "EACCES"}  # socket 0600
    path.chmod(0o777)
    caplog.set_level(logging.WARNING, logger="supervisor.daemon.server")
    got = as_nobody(nobody_connect(path))  # H2: SO_PEERCRED still refuses
    assert got == {"result": "connected", "messages": [proto.bye("permission denied")]}
    assert st.server.stats.refused_peer == 1 and st.server.stats.accepted == 0
    assert any("refused peer pid" in r.message and "uid 65534" in r.message for r in caplog.records)
    assert handler.calls == []
    st.stop()


SERVE = r"""
import asyncio, json, sys
from supervisor import protocol as proto
from supervisor.records import GpuSample, HostSample, Sample, Step, to_dict
from supervisor.daemon.server import ControlServer

path, n_samples, n_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gpu = GpuSample(index=0, name="NVIDIA H200", uuid="GPU-0f3c", util_pct=97.0, mem_util_pct=61.0,
    mem_used_mib=80213.0, mem_total_mib=143771.0, temp_c=66.0, margin_c=21.0, power_w=612.5,
    power_limit_w=700.0, sm_clock_mhz=1980.0, sm_clock_max_mhz=1980.0, throttle_mask=0,
    throttle_counters={"power": 12345678}, pcie_tx_kbs=1234.0, pcie_rx_kbs=5678.0, proc_mem_mib=79000.0)
host = HostSample(mem_total_mib=2063000.0, mem_available_mib=1800000.0, swap_used_mib=0.0,
    trainer_rss_mib=24000.0, cpu_pct=7.5, disk_free_gib=1200.0, disk_total_gib=3500.0, oom_kill_count=0)
template = to_dict(Sample(t=0.0, gpus=[gpu], host=host))
samples = [dict(template, t=1.7e9 + i) for i in range(n_samples)]
steps = [to_dict(Step(t=1.7e9 + i * 4.3, step=i, loss=1.0 / (i + 1), grad_norm=0.5, lr=2e-4,
    epoch=i / 5000, tokens=i * 16384, tokens_per_s=3800.0, step_time_s=4.3, max_steps=n_steps))
    for i in range(n_steps)]

class Handler:
    def snapshot(self):
        return {"run": {"id": "big"}, "state": "training", "samples": samples, "steps": steps,
                "events": [], "log": ["line"] * 1000}
    def handle_command(self, cmd, args, peer):
        return {"cmd": cmd}

async def main():
    srv = ControlServer(path, Handler())
    await srv.start()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        srv.broadcast(json.loads(line))
    await srv.close()

asyncio.run(main())
"""


@pytest.fixture
def spawn_server(home: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def spawn(run_id: str, n_samples: int = 10, n_steps: int = 10) -> subprocess.Popen[str]:
        path = paths.socket_path(run_id)
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(path), str(n_samples), str(n_steps)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait()


def test_24h_snapshot_arrives_complete(spawn_server: Callable[..., subprocess.Popen[str]]) -> None:
    proc = spawn_server("big", 86_400, 20_000)

    async def scenario() -> tuple[dict[str, Any], float]:
        async with AsyncRunClient(paths.socket_path("big")) as client:
            t0 = time.perf_counter()
            snap = await client.connect()
            elapsed = time.perf_counter() - t0
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(proto.state("saving")) + "\n")
            proc.stdin.flush()
            assert await client.messages().__anext__() == proto.state("saving")
            return snap, elapsed

    snap, elapsed = arun(scenario())
    size = len(proto.dumps(snap["samples"])) + len(proto.dumps(snap["steps"]))
    print(
        f"\n24 h snapshot: 86,400 samples + 20,000 steps, {size / 2**20:.0f} MiB JSON, {elapsed:.2f} s"
    )
    assert len(snap["samples"]) == 86_400 and len(snap["steps"]) == 20_000
    assert [s["t"] for s in snap["samples"][:3]] == [1.7e9, 1.7e9 + 1, 1.7e9 + 2]
    assert snap["steps"][-1]["step"] == 19_999 and len(snap["log"]) == 1000


def test_no_network_surface(spawn_server: Callable[..., subprocess.Popen[str]]) -> None:
    proc = spawn_server("net")
    client = Raw(paths.socket_path("net"))  # one live connection as well as the listener
    assert client.recv()["type"] == "hello"  # type: ignore[index]
    assert psutil.Process(proc.pid).net_connections("inet") == []
    inodes = own_socket_inodes(proc.pid)
    names = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if int(parts[6]) in inodes:
                names[int(parts[6])] = parts[7] if len(parts) > 7 else ""
    assert str(paths.socket_path("net")) in names.values()
    assert not any(name.startswith("@") for name in names.values())
    client.close()


def test_stale_socket_from_killed_server_is_replaced(
    spawn_server: Callable[..., subprocess.Popen[str]],
) -> None:
    proc = spawn_server("stale")
    path = paths.socket_path("stale")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind
    with pytest.raises(ConnectionRefusedError):
        Raw(path)
    st = ServerThread(path, FakeHandler())
    assert request(path, "ping") == {"pong": True}
    st.stop()


def test_live_socket_raises_already_running(srv: ServerThread) -> None:
    with pytest.raises(AlreadyRunning):
        srv.call(ControlServer(srv.server.path, FakeHandler()).start())
    assert request(srv.server.path, "ping") == {"pong": True}  # the first one is untouched


def test_non_socket_file_is_never_replaced(home: Path) -> None:
    path = paths.socket_path("file")
    paths.ensure_private_dir(path.parent)
    path.write_text("precious")
    with pytest.raises(AlreadyRunning, match="not a socket"):
        arun(ControlServer(path, FakeHandler()).start())
    assert path.read_text() == "precious"


# ------------------------------------------------------------------------------ paths


def test_long_state_path_falls_back_to_short_dir(
    monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    deep = home / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("QLORA_WATCH_HOME", str(deep))
    path = paths.socket_path("run-20260101-abcdef")
    assert len(os.fsencode(str(path))) <= paths.SUN_PATH_MAX
    assert path.parent.parent == paths.tmp_socket_base()
    other_home = paths.socket_path("run-20260101-abcdef")
    monkeypatch.setenv("QLORA_WATCH_HOME", str(deep) + "2")
    assert paths.socket_path("run-20260101-abcdef") != other_home  # isolated per home
    monkeypatch.setenv("QLORA_WATCH_HOME", str(deep))
    st = ServerThread(path, FakeHandler())
    try:
        assert request(path, "ping") == {"pong": True}
        assert stat.S_IMODE(os.lstat(paths.tmp_socket_base()).st_mode) == 0o700
    finally:
        st.stop()
        shutil.rmtree(path.parent, ignore_errors=True)
    with pytest.raises(paths.SocketPathTooLong):
        paths.socket_path("r" * 80)

"""Clients of a run: what the dashboard needs (`RunClient`), the socket client of a live run
(`AsyncRunClient`), the store-backed client of a finished one (`StoreClient`), and a blocking
one-command client for the CLI (`request`). The dashboard imports this module, never the core:
StoreClient opens the run store only when it is built."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from supervisor import protocol as proto
from supervisor.protocol import CommandError, ProtocolError

if TYPE_CHECKING:
    from supervisor.store import RunStore

__all__ = ["AsyncRunClient", "CommandError", "ProtocolError", "RunClient", "ServerClosed", "StoreClient",
           "request"]

_READ_SIZE = 256 * 1024
_END = object()  # end-of-stream marker in the live queue


class ServerClosed(ConnectionError):
    """The connection ended; `reason` is the server's bye reason when it gave one."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "connection closed")
        self.reason = reason


def _check_hello(msg: dict[str, Any]) -> dict[str, Any]:
    if msg["type"] == "bye":
        raise ServerClosed(msg.get("reason"))
    if msg["type"] != "hello":
        raise ProtocolError(f"expected hello, got {msg['type']!r}")
    proto.check_server_message(msg)
    if msg["version"] != proto.PROTOCOL_VERSION:
        raise ProtocolError(
            f"server speaks protocol v{msg['version']}, this client v{proto.PROTOCOL_VERSION}"
        )
    return msg


async def _connect(path: str, timeout: float) -> socket.socket:
    """A connected non-blocking Unix socket, retrying while the server's backlog is full."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                # Unix sockets answer EAGAIN (not EINPROGRESS) to a full backlog, and asyncio's
                # sock_connect would then wrongly report success; poll instead.
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"connect to {path}: backlog full for {timeout} s") from None
                await asyncio.sleep(0.01)
    except BaseException:
        sock.close()
        raise


class RunClient(Protocol):
    """What the dashboard needs from a client of a run (AsyncRunClient, StoreClient, tests'
    ReplayClient)."""

    async def connect(self, history: bool = True) -> dict[str, Any]: ...

    def messages(self) -> AsyncIterator[dict[str, Any]]: ...

    async def send_command(self, cmd: str, **args: Any) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class StoreClient:
    """A read-only client over a finished run's store: no supervisor and no socket, and
    attaching still shows its history."""

    def __init__(self, run_dir: Path):
        from supervisor.store import (
            RunStore,  # here, not at import: the dashboard imports this module
        )

        self.store: RunStore = RunStore(Path(run_dir))

    async def connect(self, history: bool = True) -> dict[str, Any]:
        from supervisor.records import to_dict

        s = self.store
        return {
            "run": s.run_info().to_json(), "state": s.read_status().to_json(),  # as the live snapshot
            "samples": s.samples() if history else [], "steps": s.steps() if history else [],
            "events": [to_dict(e) for e in s.events()], "log": s.log_tail(500),
        }

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        return
        yield  # an empty async generator: a finished run sends nothing live

    async def send_command(self, cmd: str, **args: Any) -> dict[str, Any]:
        if cmd == "ack":
            return {"acked": self.store.ack_events(args.get("event_ids"))}
        if cmd in ("ping", "status"):
            return {"state": self.store.read_status().to_json()}
        raise RuntimeError(f"run {self.store.run_id} has ended: {cmd!r} is not possible")

    async def close(self) -> None:
        self.store.close()


class AsyncRunClient:
    """Attach to a run's control socket: a snapshot, then live messages and command replies."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        series_limit: int | None = None,
        timeout: float = 30.0,
        queue_size: int = 100_000,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.series_limit = series_limit
        self.timeout = timeout  # per read while connecting, and per command reply
        self.hello: dict[str, Any] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = proto.FrameDecoder(proto.MAX_FRAME_SERVER_TO_CLIENT)
        self._backlog: deque[dict[str, Any]] = deque()  # decoded but not yet consumed
        # Bounded: a consumer that stops iterating makes the reader stop reading, and then
        # the server drops this client as too slow instead of this process growing forever.
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader_task: asyncio.Task[None] | None = None
        self._ended = False
        self.bye_reason: str | None = None

    async def __aenter__(self) -> AsyncRunClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, history: bool = True) -> dict[str, Any]:
        """Connect, attach and return the assembled snapshot (run, state and the four series)."""
        sock = await _connect(self.socket_path, self.timeout)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        try:
            self.hello = _check_hello(await self._next())
            attach = proto.attach(history=history, series_limit=self.series_limit)
            self._writer.write(proto.encode(attach, proto.MAX_FRAME_CLIENT_TO_SERVER))
            await self._writer.drain()
            snap = await self._read_snapshot()
        except BaseException:
            await self.close()
            raise
        self._reader_task = asyncio.create_task(self._read_forever())
        return snap

    async def _read_snapshot(self) -> dict[str, Any]:
        begin = await self._next()
        if begin["type"] == "bye":
            raise ServerClosed(begin.get("reason"))
        if begin["type"] != "snapshot_begin":
            raise ProtocolError(f"expected snapshot_begin, got {begin['type']!r}")
        proto.check_server_message(begin)
        snap: dict[str, Any] = {"run": begin.get("run"), "state": begin.get("state")}
        for name in proto.SERIES:
            snap[name] = []
        while True:
            msg = await self._next()
            kind = msg["type"]
            if kind == "snapshot_chunk":
                proto.check_server_message(msg)
                snap[msg["series"]].extend(msg["items"])
            elif kind == "snapshot_end":
                break
            elif kind == "bye":
                raise ServerClosed(msg.get("reason"))
            else:
                raise ProtocolError(f"unexpected {kind!r} inside the snapshot")
        skipped = msg.get("skipped") or {}
        for name in proto.SERIES:
            want = int(begin["counts"].get(name, 0)) - int(skipped.get(name, 0))
            if len(snap[name]) != want:
                raise ProtocolError(f"incomplete snapshot: {name} has {len(snap[name])} of {want}")
        return snap

    async def _next(self) -> dict[str, Any]:
        """The next message while connecting (before the reader task owns the socket)."""
        assert self._reader is not None
        while not self._backlog:
            data = await asyncio.wait_for(self._reader.read(_READ_SIZE), self.timeout)
            if not data:
                raise ServerClosed(None)
            self._backlog.extend(self._decoder.feed(data))
        return self._backlog.popleft()

    async def _read_forever(self) -> None:
        assert self._reader is not None
        try:
            while self._backlog:
                await self._route(self._backlog.popleft())
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                for msg in self._decoder.feed(data):
                    await self._route(msg)
        except (ProtocolError, ConnectionError, OSError):
            pass  # treated as the end of the stream; waiters learn below
        finally:
            self._finish()

    async def _route(self, msg: dict[str, Any]) -> None:
        proto.check_server_message(msg)
        kind = msg["type"]
        if kind == "reply":
            waiter = self._waiters.pop(msg["id"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)
            return
        if kind == "bye":
            self.bye_reason = msg.get("reason")
        elif kind not in proto.LIVE_TYPES:
            return  # a newer server's message type: ignore rather than fail
        await self._queue.put(msg)

    def _finish(self) -> None:
        if self._ended:
            return
        self._ended = True
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(ServerClosed(self.bye_reason))
        self._waiters.clear()
        try:
            self._queue.put_nowait(_END)
        except asyncio.QueueFull:
            pass  # messages() notices _ended once it has drained the queue

    def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Live messages (sample/step/event/log/state/bye) until the connection closes."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            if self._ended and self._queue.empty():
                return
            item = await self._queue.get()
            if item is _END:
                return
            yield item

    async def send_command(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send a command, wait for its reply (matched by id) and return the reply's data."""
        if self._writer is None or self._reader_task is None:
            raise RuntimeError("connect() first")
        if self._ended:
            raise ServerClosed(self.bye_reason)
        cmd_id = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[cmd_id] = waiter
        try:
            msg = proto.encode(proto.command(cmd_id, cmd, args), proto.MAX_FRAME_CLIENT_TO_SERVER)
            self._writer.write(msg)
            await self._writer.drain()
            reply = await asyncio.wait_for(waiter, self.timeout)
        finally:
            self._waiters.pop(cmd_id, None)
        if not reply["ok"]:
            raise CommandError(reply.get("error") or "command failed")
        return reply.get("data") or {}

    async def close(self) -> None:
        """Close the connection; messages() ends and pending commands fail."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
        self._finish()
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None


def request(
    socket_path: str | os.PathLike[str], cmd: str, timeout: float = 5, **args: Any
) -> dict[str, Any]:
    """Send one command over a blocking socket and return the reply's data (for the CLI)."""
    deadline = time.monotonic() + timeout
    decoder = proto.FrameDecoder(proto.MAX_FRAME_SERVER_TO_CLIENT)
    backlog: deque[dict[str, Any]] = deque()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:

        def next_msg() -> dict[str, Any]:
            while not backlog:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no reply to {cmd!r} within {timeout} s")
                sock.settimeout(remaining)
                data = sock.recv(_READ_SIZE)
                if not data:
                    raise ServerClosed(None)
                backlog.extend(decoder.feed(data))
            return backlog.popleft()

        while True:  # EAGAIN while the server's backlog is full: retry until the deadline
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                sock.connect(os.fspath(socket_path))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"connect to {socket_path}: backlog full") from None
                time.sleep(0.01)
        _check_hello(next_msg())
        sock.sendall(proto.encode(proto.command(1, cmd, args), proto.MAX_FRAME_CLIENT_TO_SERVER))
        while True:
            msg = next_msg()
            if msg["type"] == "bye":
                raise ServerClosed(msg.get("reason"))
            if msg["type"] == "reply" and msg.get("id") == 1:
                proto.check_server_message(msg)
                if not msg["ok"]:
                    raise CommandError(msg.get("error") or "command failed")
                return msg.get("data") or {}

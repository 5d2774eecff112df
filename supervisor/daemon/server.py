"""The supervisor's control socket: a Unix-socket server for dashboards and CLI commands.

One asyncio server, any number of clients (like tmux). Every connection is checked with
SO_PEERCRED; every attached client has a bounded output queue and is dropped when it falls
behind, so `broadcast()` never blocks the supervisor. There is no TCP listener and no abstract
socket name: the socket is a file in a 0700 dir, bound under umask 0o177.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

from supervisor import protocol as proto
from supervisor.paths import AlreadyRunning as AlreadyRunning  # re-exported for callers
from supervisor.paths import bind_private_socket
from supervisor.protocol import CommandError, ProtocolError

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}: 3 ints
_WRITE_HIGH_WATER = 256 * 1024  # transport bytes before the writer waits for the peer


@dataclass(frozen=True)
class PeerInfo:
    """Who is on the other end, from SO_PEERCRED (kernel-verified, not client-supplied)."""

    pid: int
    uid: int
    gid: int


CommandResult = Union[dict[str, Any], None, Awaitable[Union[dict[str, Any], None]]]


class Handler(Protocol):
    """What the server needs from the supervisor core."""

    def snapshot(self) -> dict[str, Any]:
        """Keys run, state, samples, steps, events, log (lists); called in the event loop."""
        ...

    def handle_command(self, cmd: str, args: dict[str, Any], peer: PeerInfo) -> CommandResult:
        """Carry out a validated command; return reply data or raise CommandError."""
        ...


@dataclass(frozen=True)
class ServerLimits:
    """Bounds that keep one client from costing the supervisor memory, time or fds."""

    max_clients: int = 64  # connections beyond this get bye "too many clients"
    queue_messages: int = 10_000  # per attached client; overflow drops it as "too slow"
    queue_bytes: int = 32 * 1024 * 1024  # the same, in bytes
    handshake_timeout: float = 10.0  # first complete message (attach or command) due by then
    frame_timeout: float = 30.0  # a started frame must finish within this (slowloris)
    max_inflight_commands: int = 8  # per connection
    close_grace: float = 1.0  # seconds a closing connection may take to flush its bye


@dataclass
class ServerStats:
    """Counters for the supervisor's status and for tests."""

    accepted: int = 0
    refused_peer: int = 0  # SO_PEERCRED uid not allowed
    refused_full: int = 0  # max_clients reached
    protocol_errors: int = 0  # bad frames, bad JSON, half frames: that connection closed
    timeouts: int = 0  # no attach/command in time, or a frame trickled too slowly
    dropped_slow: int = 0  # output queue overflowed
    commands: int = 0
    dropped_broadcasts: int = 0  # a live message too large for a frame


_QueueItem = Union[bytes, Iterator[bytes]]  # an encoded frame, or a lazily encoded snapshot


@dataclass(eq=False)
class _Client:
    """One accepted connection and its bounded output queue."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: PeerInfo
    attached: bool = False
    ending: bool = False  # a bye is queued; nothing more is added
    closed: bool = False
    queue: deque[_QueueItem] = field(default_factory=deque)
    queued_bytes: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: int = 0
    conn_task: asyncio.Task[None] | None = None
    write_task: asyncio.Task[None] | None = None


class _Timeout(Exception):
    pass


class ControlServer:
    """Serve one run's control socket to dashboards and CLI commands."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Handler,
        *,
        run_id: str | None = None,
        limits: ServerLimits = ServerLimits(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        self.path = Path(path).absolute()
        self.handler = handler
        self.run_id = run_id if run_id is not None else self.path.stem
        self.limits = limits
        self.stats = ServerStats()
        self._clients: set[_Client] = set()
        self._server: asyncio.AbstractServer | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we created
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create the private dir, replace a stale socket, bind under umask 0o177, listen."""
        sock = bind_private_socket(self.path)
        st = os.lstat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        # A full backlog makes a non-blocking connect() fail with EAGAIN, so keep it above a
        # burst of clients (asyncio would otherwise re-listen with its default of 100).
        self._server = await asyncio.start_unix_server(self._on_connect, sock=sock, backlog=512)
        log.info("control socket listening on %s", self.path)

    def bound(self) -> bool:
        """Whether our socket file is still at its path (not removed, not replaced)."""
        if self._bound is None:
            return False
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._bound

    async def ensure_bound(self) -> bool:
        """Bind again when the socket or its folder was removed (pam_systemd at logout, a tmp
        cleaner, a user's rm): connected clients keep their connections. False when it cannot
        (another live server took the path, an unsafe folder): logged, tried again later."""
        if self._server is None or self.bound():
            return True
        try:
            sock = bind_private_socket(self.path)
        except (OSError, RuntimeError) as exc:  # AlreadyRunning, UnsafeDirError, a full /tmp
            log.warning("control socket %s is gone and cannot be bound again: %s", self.path, exc)
            return False
        self._server.close()  # the old listening socket only; connections stay
        st = os.lstat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._on_connect, sock=sock, backlog=512)
        log.warning("control socket %s had vanished: bound again", self.path)
        return True

    async def close(self, reason: str = "server shutting down") -> None:
        """Flush every client's queue and a bye, stop listening, remove our socket file."""
        if self._server is not None:
            self._server.close()
        clients = list(self._clients)
        for client in clients:
            self._end(client, reason)
        writers = [c.write_task for c in clients if c.write_task is not None]
        if writers:
            await asyncio.wait(writers, timeout=self.limits.close_grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.limits.close_grace)
        for client in clients:
            self._drop(client, None)
            client.writer.transport.abort()  # the loop may stop before the grace timers fire
        if self._bound is not None:
            try:
                st = os.lstat(self.path)
                # Only our own socket: a newer server may have replaced the file meanwhile.
                if (st.st_dev, st.st_ino) == self._bound:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._bound = None
        self._server = None

    # -------------------------------------------------------------------------- broadcast

    def broadcast(self, msg: dict[str, Any]) -> None:
        """Queue a live message for every attached client; a bye ends every connection."""
        kind = msg.get("type")
        if kind == "bye":  # after what is already queued, then hang up (the run has ended)
            for client in list(self._clients):
                self._end(client, str(msg.get("reason") or "bye"))
            return
        if kind not in proto.LIVE_TYPES:
            # Never raise into the supervisor's loop over a message meant for a screen.
            self.stats.dropped_broadcasts += 1
            log.warning("not broadcasting message type %r", kind)
            return
        targets = [c for c in self._clients if c.attached and not c.ending]
        if not targets:
            return
        try:
            data = proto.encode(msg)  # once, shared by every client's queue
        except ProtocolError as exc:
            self.stats.dropped_broadcasts += 1
            log.warning("not broadcasting %s: %s", kind, exc)
            return
        for client in targets:
            self._enqueue(client, data)

    def _end(self, client: _Client, reason: str) -> None:
        """Send what is queued, then a bye, then close (the writer closes after the bye)."""
        if client.closed or client.ending:
            return
        client.queue.append(proto.encode(proto.bye(reason)))  # past the limits: it is the last
        client.ending = True
        client.wakeup.set()

    def _enqueue(self, client: _Client, item: _QueueItem) -> None:
        if client.closed or client.ending:
            return
        size = len(item) if isinstance(item, bytes) else 0
        if (
            len(client.queue) >= self.limits.queue_messages
            or client.queued_bytes + size > self.limits.queue_bytes
        ):
            self.stats.dropped_slow += 1
            log.warning(
                "dropping slow client pid %d: %d messages (%d bytes) queued",
                client.peer.pid,
                len(client.queue),
                client.queued_bytes,
            )
            self._drop(client, "too slow")
            return
        client.queue.append(item)
        client.queued_bytes += size
        client.wakeup.set()

    # -------------------------------------------------------------------------- connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = writer.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            peer = PeerInfo(*_PEERCRED.unpack(raw))
        except OSError as exc:
            log.warning("refused peer: SO_PEERCRED failed: %s", exc)
            self._hang_up(writer.transport, "permission denied")
            return
        # Only our own uid, plus root (tmux server-acl.c): the file mode is the first fence,
        # this is the second, in case someone loosens the dir or socket permissions.
        if peer.uid not in (os.geteuid(), 0):
            self.stats.refused_peer += 1
            log.warning("refused peer pid %d uid %d", peer.pid, peer.uid)
            self._hang_up(writer.transport, "permission denied")
            return
        if len(self._clients) >= self.limits.max_clients:
            self.stats.refused_full += 1
            log.warning("refused peer pid %d: %d clients already", peer.pid, len(self._clients))
            self._hang_up(writer.transport, "too many clients")
            return
        client = _Client(reader, writer, peer)
        client.conn_task = asyncio.current_task()
        self._clients.add(client)
        self.stats.accepted += 1
        self._enqueue(client, proto.encode(proto.hello(self.run_id, os.getpid())))
        client.write_task = self._spawn(self._write_loop(client))
        reason: str | None = None
        try:
            await self._read_loop(client)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.warning("closing client pid %d: protocol error: %s", peer.pid, exc)
            reason = f"protocol error: {exc}"
        except _Timeout as exc:
            self.stats.timeouts += 1
            log.warning("closing client pid %d: %s", peer.pid, exc)
            reason = str(exc)
        except (OSError, asyncio.CancelledError):
            pass  # the peer went away, or broadcast/close dropped it and already said bye
        except Exception:  # a bug here must cost one connection, never the supervisor
            log.exception("client pid %d failed", peer.pid)
            reason = "internal error"
        finally:
            self._drop(client, reason)

    def _hang_up(self, transport: asyncio.WriteTransport, reason: str | None) -> None:
        """Try to send bye, close, and abort after close_grace whatever the peer does."""
        if reason is not None and not transport.is_closing():
            try:
                transport.write(proto.encode(proto.bye(reason)))
            except (ConnectionError, OSError):
                pass
        transport.close()
        # close() waits for the buffer to flush; a peer that never reads would keep it forever.
        asyncio.get_running_loop().call_later(self.limits.close_grace, transport.abort)

    def _drop(self, client: _Client, reason: str | None) -> None:
        """Close a connection once; try to say why; never wait for the peer."""
        if client.closed:
            return
        client.closed = True
        self._clients.discard(client)
        client.queue.clear()
        client.queued_bytes = 0
        current = asyncio.current_task()
        for task in (client.write_task, client.conn_task):
            if task is not None and task is not current:
                task.cancel()
        self._hang_up(client.writer.transport, reason)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _read_loop(self, client: _Client) -> None:
        loop = asyncio.get_running_loop()
        decoder = proto.FrameDecoder(proto.MAX_FRAME_CLIENT_TO_SERVER)
        greeted = False
        deadline: float | None = loop.time() + self.limits.handshake_timeout
        while not client.closed:
            timeout = None if deadline is None else deadline - loop.time()
            try:
                if timeout is not None and timeout <= 0:
                    raise asyncio.TimeoutError
                data = await asyncio.wait_for(client.reader.read(65536), timeout)
            except asyncio.TimeoutError:
                raise _Timeout("frame timeout" if greeted else "handshake timeout") from None
            if not data:
                if decoder.pending:
                    raise ProtocolError("connection closed in the middle of a frame")
                return
            messages = decoder.feed(data)
            for msg in messages:
                greeted = True
                self._dispatch(client, proto.check_client_message(msg))
                if client.closed:
                    return
            # Slowloris: a started frame must finish within frame_timeout of its first byte.
            if not greeted:
                continue
            if not decoder.pending:
                deadline = None
            elif deadline is None or messages:
                deadline = loop.time() + self.limits.frame_timeout

    def _dispatch(self, client: _Client, msg: dict[str, Any]) -> None:
        if msg["type"] == "attach":
            if client.attached:
                raise ProtocolError("already attached")
            try:
                snap = self.handler.snapshot()
            except Exception:
                log.exception("snapshot failed")
                self._drop(client, "internal error")
                return
            # No await between taking the snapshot and subscribing: the client sees every
            # live message after the snapshot, none twice and none missing.
            frames = proto.snapshot_frames(
                snap, series_limit=msg.get("series_limit"), history=msg.get("history", True)
            )
            self._enqueue(client, frames)
            client.attached = True
            return
        self._command(client, msg["id"], msg["cmd"], msg.get("args", {}))

    def _command(self, client: _Client, cmd_id: int | str, cmd: str, args: dict[str, Any]) -> None:
        self.stats.commands += 1
        try:
            args = proto.check_command_args(cmd, args)
        except CommandError as exc:
            self._send_reply(client, proto.reply(cmd_id, False, error=str(exc)))
            return
        if cmd == "ping":
            self._send_reply(client, proto.reply(cmd_id, True, data={"pong": True}))
            return
        if client.inflight >= self.limits.max_inflight_commands:
            self._send_reply(
                client, proto.reply(cmd_id, False, error="too many commands in flight")
            )
            return
        client.inflight += 1
        self._spawn(self._run_command(client, cmd_id, cmd, args))

    async def _run_command(
        self, client: _Client, cmd_id: int | str, cmd: str, args: dict[str, Any]
    ) -> None:
        try:
            result = self.handler.handle_command(cmd, args, client.peer)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                result = {}
            if not isinstance(result, dict):
                raise TypeError(f"handle_command returned {type(result).__name__}, not dict")
            msg = proto.reply(cmd_id, True, data=result)
        except CommandError as exc:
            msg = proto.reply(cmd_id, False, error=str(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("command %s failed", cmd)
            msg = proto.reply(cmd_id, False, error="internal error")
        finally:
            client.inflight -= 1
        self._send_reply(client, msg)

    def _send_reply(self, client: _Client, msg: dict[str, Any]) -> None:
        try:
            data = proto.encode(msg)
        except ProtocolError as exc:
            data = proto.encode(proto.reply(msg["id"], False, error=f"reply not sendable: {exc}"))
        self._enqueue(client, data)

    async def _write_loop(self, client: _Client) -> None:
        writer = client.writer
        try:
            while not client.closed:
                while client.queue:
                    item = client.queue.popleft()
                    if isinstance(item, bytes):
                        client.queued_bytes -= len(item)
                        writer.write(item)
                        if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                            await writer.drain()
                        continue
                    for data in item:  # the snapshot, encoded one chunk at a time
                        writer.write(data)
                        await writer.drain()
                        await asyncio.sleep(0)  # let the supervisor's loop run between chunks
                await writer.drain()
                if client.ending and not client.queue:
                    self._drop(client, None)  # the bye is out: close after the flush
                    return
                if not client.queue:
                    client.wakeup.clear()
                    await client.wakeup.wait()
        except (ConnectionError, OSError):
            self._drop(client, None)
        except Exception:  # e.g. the snapshot held something unencodable
            log.exception("writing to client pid %d failed", client.peer.pid)
            self._drop(client, "internal error")

"""The control socket's wire format: length-prefixed JSON frames, message constructors, checks.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON
holding one object with a string "type". Non-finite floats travel as the strings "NaN",
"Infinity" and "-Infinity" (strict JSON has no such numbers); `as_float` reads them back.
Full description with examples: docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from supervisor.numbers import wire

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
MAX_FRAME_SERVER_TO_CLIENT = 4 * 1024 * 1024  # every frame, snapshot chunks included
MAX_FRAME_CLIENT_TO_SERVER = 64 * 1024  # clients only send small requests
SNAPSHOT_CHUNK_TARGET = 1024 * 1024  # aim well under the limit; one chunk is one loop stall

SERIES = ("samples", "steps", "events", "log")
SERVER_TYPES = frozenset(
    "hello snapshot_begin snapshot_chunk snapshot_end sample step event log state acked reply bye".split()
)
LIVE_TYPES = frozenset({"sample", "step", "event", "log", "state", "acked"})  # broadcast() carries
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_MAX_ID_LEN = 64


class ProtocolError(Exception):
    """A peer sent something that is not a valid frame or message."""


class CommandError(Exception):
    """A command failed; the message is sent to the client as the reply's error."""


# ------------------------------------------------------------------------------ encoding


def _json_default(obj: Any) -> Any:
    # Let the core hand over its records (dataclasses, RunState) without converting first.
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite(obj: Any, depth: int = 0) -> Any:
    """Copy of obj with non-finite floats replaced by their string names."""
    if depth > 200:
        raise ProtocolError("message nested too deeply (or circular)")
    if isinstance(obj, float):
        return wire(obj)
    if isinstance(obj, dict):
        return {k: _finite(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, depth + 1) for v in obj]
    if (dataclasses.is_dataclass(obj) and not isinstance(obj, type)) or isinstance(obj, enum.Enum):
        return _finite(_json_default(obj), depth + 1)
    return obj


def dumps(obj: Any) -> bytes:
    """Compact ASCII JSON for obj, non-finite floats as strings."""
    try:
        text = json.dumps(obj, allow_nan=False, separators=(",", ":"), default=_json_default)
    except ValueError:
        # Rare slow path (a NaN loss): walk the object once, then encode strictly.
        try:
            text = json.dumps(
                _finite(obj), allow_nan=False, separators=(",", ":"), default=_json_default
            )
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"cannot encode message: {exc}") from exc
    except TypeError as exc:
        raise ProtocolError(f"cannot encode message: {exc}") from exc
    # ensure_ascii (the default) keeps lone surrogates from surrogateescape'd logs encodable.
    return text.encode("ascii")


def frame(payload: bytes, limit: int = MAX_FRAME_SERVER_TO_CLIENT) -> bytes:
    """Prefix an encoded JSON payload with its length, enforcing the limit."""
    if len(payload) > limit:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {limit}-byte limit")
    return HEADER.pack(len(payload)) + payload


def encode(msg: dict[str, Any], limit: int = MAX_FRAME_SERVER_TO_CLIENT) -> bytes:
    """One message as a complete frame."""
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("a message is a dict with a string 'type'")
    return frame(dumps(msg), limit)


def as_float(value: Any) -> float | None:
    """A numeric field as float: numbers as is, "NaN"/"Infinity"/"-Infinity" decoded, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return _NON_FINITE.get(value)
    return None


# ------------------------------------------------------------------------------ decoding


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"non-standard JSON constant {name}")


def decode_payload(payload: bytes | memoryview) -> dict[str, Any]:
    """Parse one frame's payload into a message dict, or raise ProtocolError."""
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"invalid UTF-8 at byte {exc.start}") from exc
    try:
        msg = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
        raise ProtocolError(f"invalid JSON: {str(exc)[:200]}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame holds a JSON {type(msg).__name__}, not an object")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("message has no string 'type'")
    return msg


class FrameDecoder:
    """Incremental frame parser: feed(bytes) -> complete messages; holds at most one frame."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # payload length once the header is read
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (never more than 4 + max_frame)."""
        return len(self._buf)

    @property
    def pending(self) -> bool:
        """True while a frame has started but not finished (a half frame at EOF is an error)."""
        return bool(self._buf) or self._need is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        """Consume bytes, return the messages they complete; raise ProtocolError on bad input."""
        if self._failed is not None:
            raise self._failed  # the stream position is lost after an error; never resync
        try:
            return self._feed(memoryview(data).cast("B"))
        except ProtocolError as exc:
            self._failed = exc
            self._buf = bytearray()
            raise

    def _feed(self, view: memoryview) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        pos, end = 0, len(view)
        while pos < end:
            if self._need is None:
                take = min(HEADER.size - len(self._buf), end - pos)
                self._buf += view[pos : pos + take]
                pos += take
                if len(self._buf) < HEADER.size:
                    break
                (size,) = HEADER.unpack(self._buf)
                self._buf = bytearray()
                # Checked before a single payload byte is kept: a 4 GiB prefix costs nothing.
                if size > self.max_frame:
                    raise ProtocolError(
                        f"frame length {size} exceeds the {self.max_frame}-byte limit"
                    )
                if size == 0:
                    raise ProtocolError("empty frame")
                self._need = size
                continue
            take = min(self._need - len(self._buf), end - pos)
            if not self._buf and take == self._need:
                out.append(decode_payload(view[pos : pos + take]))  # whole frame: no copy
            else:
                self._buf += view[pos : pos + take]
                if len(self._buf) < self._need:
                    pos += take
                    break
                out.append(decode_payload(self._buf))
                self._buf = bytearray()
            pos += take
            self._need = None
        return out


# ------------------------------------------------------------------------------ messages


def hello(run_id: str, server_pid: int, version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    return {"type": "hello", "version": version, "run_id": run_id, "server_pid": server_pid}


def snapshot_begin(run: Any, state: Any, counts: dict[str, int]) -> dict[str, Any]:
    return {"type": "snapshot_begin", "run": run, "state": state, "counts": counts}


def snapshot_chunk(series: str, items: list[Any]) -> dict[str, Any]:
    return {"type": "snapshot_chunk", "series": series, "items": items}


def snapshot_end(skipped: dict[str, int] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "snapshot_end"}
    if skipped:
        msg["skipped"] = skipped  # items too large for any frame, left out of the chunks
    return msg


def sample(sample: Any) -> dict[str, Any]:
    return {"type": "sample", "sample": sample}


def step(step: Any) -> dict[str, Any]:
    return {"type": "step", "step": step}


def event(event: Any) -> dict[str, Any]:
    return {"type": "event", "event": event}


def log(lines: list[str]) -> dict[str, Any]:
    return {"type": "log", "lines": lines}


def state(state: Any) -> dict[str, Any]:
    return {"type": "state", "state": state}


def acked(event_ids: list[int] | None) -> dict[str, Any]:
    return {"type": "acked", "event_ids": event_ids}  # None: every event was acknowledged


def reply(
    id: int | str, ok: bool, data: dict[str, Any] | None = None, error: str | None = None
) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "reply", "id": id, "ok": ok}
    if error is not None:
        msg["error"] = error
    if data is not None:
        msg["data"] = data
    return msg


def bye(reason: str) -> dict[str, Any]:
    return {"type": "bye", "reason": reason}


def attach(history: bool = True, series_limit: int | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "attach", "history": history}
    if series_limit is not None:
        msg["series_limit"] = series_limit
    return msg


def command(id: int | str, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "command", "id": id, "cmd": cmd, "args": args or {}}


# ------------------------------------------------------------------------------ snapshot


def snapshot_frames(
    snap: dict[str, Any], series_limit: int | None = None, history: bool = True
) -> Iterator[bytes]:
    """Encoded frames for a snapshot: begin, chunks of about 1 MiB per series, end."""
    # Copy the lists and encode run/state now, not when the iterator is consumed: the core
    # keeps appending, and what it appends from here on reaches the client as live messages.
    series = {name: list(snap.get(name) or ()) for name in SERIES} if history else {}
    if series_limit is not None:
        series = {n: items[-series_limit:] if series_limit else [] for n, items in series.items()}
    counts = {name: len(series.get(name, ())) for name in SERIES}
    begin = encode(snapshot_begin(snap.get("run"), snap.get("state"), counts))
    return _snapshot_stream(begin, series)


def _snapshot_stream(begin: bytes, series: dict[str, list[Any]]) -> Iterator[bytes]:
    yield begin
    skipped: dict[str, int] = {}
    for name, items in series.items():
        yield from _chunk_frames(name, items, skipped)
    yield encode(snapshot_end(skipped))


def _chunk_frames(series: str, items: Sequence[Any], skipped: dict[str, int]) -> Iterator[bytes]:
    head = b'{"type":"snapshot_chunk","series":"' + series.encode("ascii") + b'","items":'
    start, count = 0, 256
    while start < len(items):
        batch = items[start : start + count]
        body = dumps(list(batch))
        size = len(head) + len(body) + 1
        if size > SNAPSHOT_CHUNK_TARGET and count > 1:
            count = max(1, count // 2)  # too big: retry a smaller batch
            continue
        start += len(batch)
        if size > MAX_FRAME_SERVER_TO_CLIENT:
            # One item bigger than any frame: leave it out rather than refuse every attach.
            skipped[series] = skipped.get(series, 0) + 1
            continue
        yield frame(head + body + b"}")
        per_item = max(1, len(body) // len(batch))
        count = max(1, min(100_000, SNAPSHOT_CHUNK_TARGET * 3 // 4 // per_item))


# ------------------------------------------------------------------------------ validation


def _is_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and 0 < len(value) <= _MAX_ID_LEN)


def _no_args(args: dict[str, Any]) -> dict[str, Any]:
    if args:
        raise CommandError(f"bad arguments: unexpected {sorted(args)[0]!r}")
    return {}


def _ack_args(args: dict[str, Any]) -> dict[str, Any]:
    extra = set(args) - {"event_ids"}
    if extra:
        raise CommandError(f"bad arguments: unexpected {sorted(extra)[0]!r}")
    ids = args.get("event_ids")
    if ids is None:
        return {}  # no ids: acknowledge every event
    if (
        not isinstance(ids, list)
        or len(ids) > 10_000
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    ):
        raise CommandError("bad arguments: event_ids must be a list of at most 10000 integers")
    return {"event_ids": ids}


# The whole command surface. A name maps to its argument checker; nothing is looked up by
# attribute, so a client can never reach a method that is not listed here (supervisord CVE-2017-11610).
COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "stop": _no_args,  # graceful: SIGTERM the trainer group, let it save
    "stop_now": _no_args,  # SIGKILL after no grace
    "ack": _ack_args,  # {event_ids?: [int]}; absent means all
    "status": _no_args,
    "ping": _no_args,  # answered by the server itself
}


def check_command_args(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validated args for a known command; CommandError for unknown commands or bad args."""
    checker = COMMANDS.get(cmd)
    if checker is None:
        raise CommandError("unknown command")
    return checker(args)


def check_client_message(msg: dict[str, Any]) -> dict[str, Any]:
    """Validate the envelope of a client->server message (ProtocolError closes the connection)."""
    kind = msg["type"]
    if kind == "attach":
        if not isinstance(msg.get("history", True), bool):
            raise ProtocolError("attach.history must be a boolean")
        limit = msg.get("series_limit")
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
        ):
            raise ProtocolError("attach.series_limit must be a non-negative integer")
        return msg
    if kind == "command":
        if not _is_id(msg.get("id")):
            raise ProtocolError("command.id must be an integer or a short string")
        cmd = msg.get("cmd")
        if not isinstance(cmd, str) or not 0 < len(cmd) <= 64:
            raise ProtocolError("command.cmd must be a short string")
        if not isinstance(msg.get("args", {}), dict):
            raise ProtocolError("command.args must be an object")
        return msg
    raise ProtocolError(f"unknown client message type {kind[:64]!r}")


def check_server_message(msg: dict[str, Any]) -> dict[str, Any]:
    """Validate what a client relies on in a server->client message."""
    kind = msg["type"]
    if kind == "reply":
        if not _is_id(msg.get("id")) or not isinstance(msg.get("ok"), bool):
            raise ProtocolError("reply needs an id and a boolean ok")
    elif kind == "snapshot_chunk":
        if msg.get("series") not in SERIES or not isinstance(msg.get("items"), list):
            raise ProtocolError("snapshot_chunk needs a known series and a list of items")
    elif kind == "hello":
        if not isinstance(msg.get("version"), int):
            raise ProtocolError("hello needs an integer version")
    elif kind == "snapshot_begin":
        if not isinstance(msg.get("counts"), dict):
            raise ProtocolError("snapshot_begin needs counts")
    return msg

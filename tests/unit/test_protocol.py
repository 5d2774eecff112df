"""Frames, messages and the command table of the control socket (no sockets here)."""

from __future__ import annotations

import itertools
import json
import math
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import protocol as proto
from supervisor.protocol import CommandError, FrameDecoder, ProtocolError
from supervisor.records import Event, GpuSample, Sample, Step, to_dict

LIMIT = proto.MAX_FRAME_CLIENT_TO_SERVER


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def decode_all(
    data: bytes, max_frame: int = proto.MAX_FRAME_SERVER_TO_CLIENT
) -> list[dict[str, Any]]:
    return FrameDecoder(max_frame).feed(data)


EVERY_MESSAGE = [
    proto.hello("run-1", 1234),
    proto.snapshot_begin(
        {"id": "run-1"}, "training", {"samples": 1, "steps": 0, "events": 0, "log": 0}
    ),
    proto.snapshot_chunk("samples", [to_dict(Sample(t=1.0, gpus=[GpuSample(index=0)]))]),
    proto.snapshot_end(),
    proto.snapshot_end({"log": 1}),
    proto.sample(to_dict(Sample(t=2.0))),
    proto.step(to_dict(Step(t=3.0, step=7, loss=1.25))),
    proto.event(to_dict(Event(t=4.0, kind="guard", level="warning", message="hot", id=3))),
    proto.log(["line one", "line \x1b[2J two", "caf\u00e9 \udcff"]),
    proto.state({"state": "training", "attempt": 2}),
    proto.acked([3, 4]),
    proto.acked(None),
    proto.reply(1, True, data={"state": "training"}),
    proto.reply("x", False, error="unknown command"),
    proto.bye("too slow"),
    proto.attach(history=False, series_limit=100),
    proto.command(5, "ack", {"event_ids": [1, 2]}),
]


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: m["type"])
def test_every_message_round_trips(msg: dict[str, Any]) -> None:
    assert decode_all(proto.encode(msg)) == [msg]


def test_constructors_carry_the_documented_fields() -> None:
    assert proto.hello("r", 9) == {
        "type": "hello",
        "version": proto.PROTOCOL_VERSION,
        "run_id": "r",
        "server_pid": 9,
    }
    assert proto.reply(1, True) == {"type": "reply", "id": 1, "ok": True}
    assert proto.command(2, "stop") == {"type": "command", "id": 2, "cmd": "stop", "args": {}}
    assert proto.attach() == {"type": "attach", "history": True}


def test_dataclasses_and_enums_encode_directly() -> None:
    from supervisor.states import RunState

    msg = proto.state(RunState.TRAINING)
    assert decode_all(proto.encode(msg)) == [{"type": "state", "state": "training"}]
    step = Step(t=1.0, step=1, loss=math.nan)
    assert decode_all(proto.encode(proto.step(step)))[0]["step"]["loss"] == "NaN"


def test_non_finite_floats_travel_as_strings() -> None:
    msg = proto.step(
        {"loss": math.nan, "grad_norm": math.inf, "lr": -math.inf, "x": [1.5, math.nan]}
    )
    payload = proto.encode(msg)[4:]
    assert b"NaN" in payload and json.loads(payload)  # strict JSON, parseable anywhere
    got = decode_all(proto.encode(msg))[0]["step"]
    assert got == {"loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity", "x": [1.5, "NaN"]}
    assert math.isnan(proto.as_float(got["loss"]))  # type: ignore[arg-type]
    assert proto.as_float(got["grad_norm"]) == math.inf
    assert proto.as_float(got["lr"]) == -math.inf
    assert proto.as_float(2) == 2.0 and proto.as_float(None) is None
    assert proto.as_float(True) is None and proto.as_float("1.0") is None


def test_encode_refuses_oversize_and_non_messages() -> None:
    big = proto.log(["x" * LIMIT])
    with pytest.raises(ProtocolError, match="exceeds"):
        proto.encode(big, LIMIT)
    with pytest.raises(ProtocolError):
        proto.encode({"no": "type"})
    with pytest.raises(ProtocolError, match="cannot encode"):
        proto.encode({"type": "log", "lines": [object()]})


# ------------------------------------------------------------------------------ decoder errors


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\xff\xff\xff\xff", "exceeds"),  # 4 GiB length prefix
        (b"GET / HTTP/1.1\r\n\r\n", "exceeds"),  # garbage reads as a huge length
        (struct.pack(">I", 0), "empty frame"),
        (raw_frame(b'{"type": "x", "s": "\xff\xfe"}'), "UTF-8"),
        (raw_frame(b"[1, 2, 3]"), "not an object"),
        (raw_frame(b'"type"'), "not an object"),
        (raw_frame(b"{}"), "no string 'type'"),
        (raw_frame(b'{"type": 3}'), "no string 'type'"),
        (raw_frame(b'{"type": "x"'), "invalid JSON"),
        (raw_frame(b'{"type": "x", "v": NaN}'), "NaN"),
        (raw_frame(b'\xef\xbb\xbf{"type": "x"}'), "invalid JSON"),  # BOM
        (raw_frame(b'{"type": "x", "v": ' + b"9" * 5000 + b"}"), "invalid JSON"),  # huge int
        (raw_frame(b"[" * 60000 + b"]" * 60000), "invalid JSON|not an object"),
    ],
)
def test_decoder_rejects_bad_frames(data: bytes, match: str) -> None:
    decoder = FrameDecoder(200_000)
    with pytest.raises(ProtocolError, match=match):
        decoder.feed(data)
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError):  # poisoned: the stream cannot be resynchronised
        decoder.feed(raw_frame(b'{"type": "ok"}'))


def test_oversize_prefix_rejected_before_any_payload_is_buffered() -> None:
    decoder = FrameDecoder(LIMIT)
    assert decoder.feed(b"\x00\x01") == []  # half a header is fine
    assert decoder.pending
    with pytest.raises(ProtocolError, match="65537"):
        decoder.feed(b"\x00\x01" + b"A" * 1000)


def test_four_gib_prefix_allocates_nothing() -> None:
    tracemalloc.start()
    try:
        decoder = FrameDecoder(LIMIT)
        junk = b"\xff\xff\xff\xff" + bytes(1024 * 1024)
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with pytest.raises(ProtocolError):
            decoder.feed(junk)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_frames_split_at_every_byte_boundary() -> None:
    stream = b"".join(proto.encode(m) for m in EVERY_MESSAGE)
    decoder = FrameDecoder(proto.MAX_FRAME_SERVER_TO_CLIENT)
    got: list[dict[str, Any]] = []
    for i in range(len(stream)):
        got.extend(decoder.feed(stream[i : i + 1]))
    assert got == EVERY_MESSAGE and not decoder.pending


def test_frame_at_exactly_the_limit_is_accepted() -> None:
    head = b'{"type":"log","lines":["'
    payload = head + b"a" * (LIMIT - len(head) - 3) + b'"]}'
    assert len(payload) == LIMIT
    assert FrameDecoder(LIMIT).feed(raw_frame(payload))[0]["type"] == "log"
    with pytest.raises(ProtocolError):
        FrameDecoder(LIMIT - 1).feed(raw_frame(payload))


def test_truncated_frame_is_pending() -> None:
    decoder = FrameDecoder(LIMIT)
    data = proto.encode(proto.bye("x"))
    assert decoder.feed(data[:-1]) == [] and decoder.pending
    assert decoder.buffered == len(data) - 5
    assert decoder.feed(data[-1:]) == [proto.bye("x")] and not decoder.pending


# ------------------------------------------------------------------------------ hypothesis

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
messages = st.builds(
    lambda kind, body: {**body, "type": kind},
    st.text(min_size=1, max_size=12),
    st.dictionaries(st.text(max_size=8), json_values, max_size=6),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=8), st.lists(st.integers(0, 10**6), max_size=20))
def test_random_messages_round_trip_in_random_chunks(
    msgs: list[dict[str, Any]], cuts: list[int]
) -> None:
    stream = b"".join(proto.encode(m) for m in msgs)
    decoder = FrameDecoder(proto.MAX_FRAME_SERVER_TO_CLIENT)
    got: list[dict[str, Any]] = []
    for piece in chunked(stream, cuts):
        got.extend(decoder.feed(piece))
    assert got == msgs
    assert not decoder.pending


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(0, 10**4), max_size=20), st.integers(1, 5000))
def test_random_bytes_only_ever_raise_protocol_error(
    data: bytes, cuts: list[int], limit: int
) -> None:
    decoder = FrameDecoder(limit)
    try:
        for piece in chunked(data, cuts):
            for msg in decoder.feed(piece):
                assert isinstance(msg, dict) and isinstance(msg["type"], str)
            # Never holds more than one frame (header + payload up to the limit).
            assert decoder.buffered <= 4 + limit
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(messages, min_size=1, max_size=5),
    st.integers(0, 10**6),
    st.integers(0, 255),
    st.lists(st.integers(0, 10**6), max_size=10),
)
def test_corrupted_streams_never_crash(
    msgs: list[dict[str, Any]], pos: int, byte: int, cuts: list[int]
) -> None:
    stream = bytearray(b"".join(proto.encode(m) for m in msgs))
    stream[pos % len(stream)] = byte
    decoder = FrameDecoder(2048)
    try:
        for piece in chunked(bytes(stream), cuts):
            decoder.feed(piece)
            assert decoder.buffered <= 4 + 2048
    except ProtocolError:
        pass


# ------------------------------------------------------------------------------ snapshot chunks


def sample_dict(i: int) -> dict[str, Any]:
    return to_dict(Sample(t=float(i), gpus=[GpuSample(index=0, name="NVIDIA H200", temp_c=61.0)]))


def test_snapshot_frames_chunk_and_reassemble() -> None:
    snap = {
        "run": {"id": "r"},
        "state": "training",
        "samples": [sample_dict(i) for i in range(5000)],
        "steps": [
            to_dict(Step(t=float(i), step=i, loss=math.nan if i == 3 else 1.0)) for i in range(3000)
        ],
        "events": [],
        "log": ["x" * 100] * 50,
    }
    frames = list(proto.snapshot_frames(snap))
    assert all(len(f) - 4 <= proto.SNAPSHOT_CHUNK_TARGET for f in frames)
    msgs = [decode_all(f)[0] for f in frames]
    assert msgs[0]["type"] == "snapshot_begin" and msgs[-1] == {"type": "snapshot_end"}
    assert msgs[0]["counts"] == {"samples": 5000, "steps": 3000, "events": 0, "log": 50}
    series: dict[str, list[Any]] = {name: [] for name in proto.SERIES}
    for m in msgs[1:-1]:
        assert m["type"] == "snapshot_chunk"
        series[m["series"]].extend(m["items"])
    assert len(msgs) > 4  # really chunked
    assert series["samples"] == snap["samples"]
    assert series["steps"][3]["loss"] == "NaN" and len(series["steps"]) == 3000


def test_snapshot_series_limit_and_no_history() -> None:
    snap = {
        "run": None,
        "state": "x",
        "samples": list(range(100)),
        "steps": [1, 2],
        "events": [],
        "log": [],
    }
    msgs = [decode_all(f)[0] for f in proto.snapshot_frames(snap, series_limit=10)]
    assert msgs[0]["counts"]["samples"] == 10 and msgs[1]["items"] == list(range(90, 100))
    msgs = [decode_all(f)[0] for f in proto.snapshot_frames(snap, history=False)]
    assert [m["type"] for m in msgs] == ["snapshot_begin", "snapshot_end"]
    assert msgs[0]["counts"] == {"samples": 0, "steps": 0, "events": 0, "log": 0}
    msgs = [decode_all(f)[0] for f in proto.snapshot_frames(snap, series_limit=0)]
    assert len(msgs) == 2


def test_snapshot_is_taken_when_called_not_when_sent() -> None:
    state = {"state": "training"}
    snap = {"run": None, "state": state, "samples": [1, 2], "steps": [], "events": [], "log": []}
    frames = proto.snapshot_frames(snap)
    snap["samples"].append(3)  # what the core does next reaches the client as a live message
    state["state"] = "saving"
    msgs = [decode_all(f)[0] for f in frames]
    assert msgs[0]["state"] == {"state": "training"} and msgs[1]["items"] == [1, 2]


def test_snapshot_item_larger_than_a_frame_is_skipped_and_reported() -> None:
    huge = "x" * (proto.MAX_FRAME_SERVER_TO_CLIENT + 10)
    snap = {
        "run": None,
        "state": None,
        "samples": [],
        "steps": [],
        "events": [],
        "log": ["a", huge, "b"],
    }
    msgs = [decode_all(f)[0] for f in proto.snapshot_frames(snap)]
    items = [i for m in msgs if m["type"] == "snapshot_chunk" for i in m["items"]]
    assert items == ["a", "b"]
    assert msgs[-1] == {"type": "snapshot_end", "skipped": {"log": 1}}


# ------------------------------------------------------------------------------ validation


def test_command_table_is_explicit() -> None:
    assert set(proto.COMMANDS) == {"stop", "stop_now", "ack", "status", "ping"}
    assert proto.check_command_args("ack", {}) == {}
    assert proto.check_command_args("ack", {"event_ids": [1, 2]}) == {"event_ids": [1, 2]}
    for cmd in ("__class__", "snapshot", "handle_command", "eval", "STOP", ""):
        with pytest.raises(CommandError, match="unknown command"):
            proto.check_command_args(cmd, {})


@pytest.mark.parametrize(
    "cmd, args",
    [
        ("stop", {"x": 1}),
        ("ack", {"event_ids": "all"}),
        ("ack", {"event_ids": [True]}),
        ("ack", {"event_ids": [1.5]}),
        ("ack", {"ids": [1]}),
        ("status", {"verbose": True}),
    ],
)
def test_bad_command_args(cmd: str, args: dict[str, Any]) -> None:
    with pytest.raises(CommandError, match="bad arguments"):
        proto.check_command_args(cmd, args)


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "attach", "history": "yes"},
        {"type": "attach", "series_limit": -1},
        {"type": "attach", "series_limit": True},
        {"type": "command", "cmd": "stop", "args": {}},  # no id
        {"type": "command", "id": True, "cmd": "stop"},
        {"type": "command", "id": "x" * 65, "cmd": "stop"},
        {"type": "command", "id": 1, "cmd": 5},
        {"type": "command", "id": 1, "cmd": "stop", "args": [1]},
        {"type": "subscribe"},
        {"type": "hello", "version": 1},  # a server message from a client
    ],
)
def test_bad_client_messages(msg: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        proto.check_client_message(msg)


def test_good_client_messages() -> None:
    assert proto.check_client_message(proto.attach(series_limit=5))
    assert proto.check_client_message(proto.command("abc", "unknown-but-well-formed"))


def test_server_message_checks() -> None:
    with pytest.raises(ProtocolError):
        proto.check_server_message({"type": "reply", "id": 1})
    with pytest.raises(ProtocolError):
        proto.check_server_message({"type": "snapshot_chunk", "series": "gpu", "items": []})
    assert proto.check_server_message({"type": "future_thing"})

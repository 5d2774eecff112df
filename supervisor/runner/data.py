"""Load a JSONL training file in one of three formats, with errors that name file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal

Format = Literal["messages", "text", "prompt_completion"]
FORMATS: tuple[str, ...] = ("messages", "text", "prompt_completion")
ROLES = frozenset({"system", "user", "assistant", "tool"})


class DataError(ValueError):
    """A data file or record that cannot be used; the message starts with `file:line:`."""


def detect_format(record: dict[str, Any]) -> Format:
    """The format of one record, from its keys."""
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(record)) or "none"
    raise ValueError(
        f'no "messages", "text" or "prompt"/"completion" key (keys: {keys})'
    )


def _check_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)} (got {role!r})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string (got {type(content).__name__})")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("messages has no assistant turn: nothing to learn")
    return out


def _check_str(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        got = "missing" if key not in record else type(value).__name__
        raise ValueError(f'"{key}" must be a string ({got})')
    if not value:
        raise ValueError(f'"{key}" is empty')
    return value


def _check_object(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object (got {type(record).__name__})")
    return record


def normalise(record: Any, fmt: Format) -> dict[str, Any]:
    """The record reduced to the columns trl expects for `fmt`; ValueError when it does not fit."""
    record = _check_object(record)
    if fmt == "messages":
        return {"messages": _check_messages(record.get("messages"))}
    if fmt == "text":
        return {"text": _check_str(record, "text")}
    return {"prompt": _check_str(record, "prompt"), "completion": _check_str(record, "completion")}


def iter_records(path: str | Path, fmt: str = "auto") -> Iterator[tuple[dict[str, Any], Format]]:
    """(normalised record, format) for each record of a JSONL file, streaming: every line is
    parsed and checked, blank lines skipped. Raises DataError naming `file:line`."""
    p = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{p}: unknown data format {fmt!r} (one of auto, {', '.join(FORMATS)})")
    try:
        fh = p.open("r", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: no such data file") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a folder, not a JSONL file") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e.strerror}") from None
    chosen: Format | None = None if fmt == "auto" else fmt  # type: ignore[assignment]
    with fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}:{e.colno}: invalid JSON: {e.msg}") from None
                try:
                    if chosen is None:
                        chosen = detect_format(_check_object(obj))
                    record = normalise(obj, chosen)
                except ValueError as e:
                    raise DataError(f"{p}:{lineno}: {e} (format {chosen or 'auto'})") from None
                yield record, chosen
        except UnicodeDecodeError as e:
            raise DataError(f"{p}:{lineno + 1}: not valid UTF-8 ({e.reason})") from None


def load_records(
    path: str | Path, fmt: str = "auto", max_samples: int | None = None
) -> tuple[list[dict[str, Any]], Format]:
    """Read a JSONL file: (normalised records, format). Blank lines are skipped. Raises DataError."""
    records: list[dict[str, Any]] = []
    chosen: Format | None = None
    for record, found in iter_records(path, fmt):
        records.append(record)
        chosen = found
        if max_samples is not None and len(records) >= max_samples:
            break
    if not records or chosen is None:
        raise DataError(f"{Path(path)}: no records (an empty file?)")
    return records, chosen


def check_records(path: str | Path, fmt: str = "auto") -> tuple[int, Format]:
    """Check every line without keeping the records (`qlora-watch validate`): (count, format)."""
    n, chosen = 0, None
    for _record, found in iter_records(path, fmt):
        n, chosen = n + 1, found
    if not n or chosen is None:
        raise DataError(f"{Path(path)}: no records (an empty file?)")
    return n, chosen


def texts_of(record: dict[str, Any]) -> list[str]:
    """The strings inside a normalised record (what a tokenizer is trained on)."""
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    if "text" in record:
        return [record["text"]]
    return [record["prompt"], record["completion"]]


def to_dataset(records: list[dict[str, Any]]) -> Any:
    """A `datasets.Dataset` of the records (imports datasets lazily: it is slow to import)."""
    from datasets import Dataset

    return Dataset.from_list(records)

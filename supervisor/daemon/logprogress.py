"""Progress of a trainer that writes no events, read from its log lines.

The HF Trainer prints a dict per logging step (`{'loss': '10.78', 'grad_norm': '0.2812',
'learning_rate': '1e-04', 'epoch': '0.1'}`; strings in transformers 5, floats before) and
draws a tqdm bar (`  7/60 [00:03<00:25, 2.1it/s]`) that the wrapper's \\r-splitting turns into
lines. The dict carries no step: the bar does, and tqdm redraws the bar right after each
`tqdm.write`, so a dict takes the step of the next bar line (or of the last one seen).
"""

from __future__ import annotations

import ast
import re
import time
from typing import Any

_DICT = re.compile(r"^\s*(\{.*'(?:loss|train_loss)'\s*:.*\})\s*$")
_BAR = re.compile(r"(?<![\d/])(\d+)/(\d+) \[[\d:?]+<[\d:?]+")
# tqdm without a total (`25it [00:00, 224.89it/s]`): what the HF Trainer draws once it runs past
# max_steps, e.g. the one step it takes when resumed from a checkpoint already at max_steps
# (a bar with a description, "Loading weights: 291it [...]", is not the Trainer's)
_COUNT = re.compile(r"^\s*(\d+)it \[[\d:?]+[,\]]")
FIELDS = {"loss": "loss", "grad_norm": "grad_norm", "learning_rate": "lr", "epoch": "epoch",
          "num_input_tokens_seen": "tokens"}
PENDING_S = 2.0  # a dict with no bar line after it is taken at the last bar step after this


def parse_dict(line: str) -> dict[str, Any] | None:
    """A HF log dict's values under our names ({'lr': '1e-04', ...}), or None for any other line.
    Values stay as printed: Step.from_trainer turns them into numbers, as for every step source."""
    m = _DICT.match(line)
    if not m:
        return None
    try:
        d = ast.literal_eval(m.group(1))  # a Python dict repr, never eval()
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(d, dict) or "loss" not in d:  # train_loss: the end-of-training summary
        return None
    return {ours: d.get(theirs) for theirs, ours in FIELDS.items()}


def parse_bar(line: str) -> tuple[int, int | None] | None:
    """(step, total) of a tqdm bar line, (step, None) of a bar without a total, or None."""
    hits = _BAR.findall(line)
    if not hits:
        count = _COUNT.match(line)
        return (int(count.group(1)), None) if count else None
    n, total = (int(x) for x in hits[-1])
    return (n, total) if 0 <= n <= total and total > 0 else None


class LogProgress:
    """Feed log lines; take step records (dicts for store.add_steps' Step) and bar progress."""

    def __init__(self) -> None:
        self.bar: tuple[int, int] | None = None  # the newest (step, total)
        self.pending: tuple[float, dict[str, Any]] | None = None
        self.seen_dict = False

    def feed(self, lines: list[str], now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        out: list[dict[str, Any]] = []
        for line in lines:
            found = parse_bar(line)
            if found is not None:
                n, total = found
                if total is None:  # counting past the known total: the step is still the step
                    total = max(n, self.bar[1] if self.bar else n)
                self.bar = (n, total)
                if self.pending is not None:
                    out += self._flush(now)
                continue
            d = parse_dict(line)
            if d is not None:
                self.seen_dict = True
                out += self._flush(now)
                self.pending = (now, d)
        if self.pending is not None and now - self.pending[0] >= PENDING_S:
            out += self._flush(now)
        return out

    def _flush(self, now: float) -> list[dict[str, Any]]:
        if self.pending is None:
            return []
        t, d = self.pending
        self.pending = None
        if self.bar is None:
            return []  # no step known: the bar is off (disable_tqdm) and no callback runs
        step, total = self.bar
        return [{"event": "step", "t": t, "step": step, "max_steps": total, **d}]

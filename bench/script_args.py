"""The command line that the ported trainer scripts share (bench/article_port.py,
bench/unsloth_script.py): model, data, output, events file, the run's shape and schedule."""

from __future__ import annotations

import argparse


def script_parser() -> argparse.ArgumentParser:
    """--model --data --out --events, then seq, batch, accum, r, steps, lr, warmup, grad norm."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=0.03)
    return ap

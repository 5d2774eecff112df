"""Regenerate the tiny datasets: single-digit arithmetic in the three JSONL formats.

    python recipes/data/make_tiny_data.py      # writes tiny-chat.jsonl, tiny-text.jsonl, tiny-prompt-completion.jsonl

Deterministic (fixed seed), so the committed files and the tiny tokenizer cache stay stable.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def problems(n: int, seed: int) -> list[tuple[int, str, int, int]]:
    """n (a, op, b, answer) with single digits; subtraction never goes negative."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        out.append((a, op, b, a + b if op == "+" else a - b))
    return out


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    chat = [
        {"messages": [
            {"role": "user", "content": f"What is {a} {op} {b}?"},
            {"role": "assistant", "content": f"{a} {op} {b} = {c}"},
        ]}
        for a, op, b, c in problems(512, seed=0)
    ]
    write("tiny-chat.jsonl", chat)
    write("tiny-text.jsonl", [{"text": f"{a} {op} {b} = {c}"} for a, op, b, c in problems(64, seed=1)])
    write(
        "tiny-prompt-completion.jsonl",
        [{"prompt": f"{a} {op} {b} =", "completion": f" {c}"} for a, op, b, c in problems(64, seed=2)],
    )


if __name__ == "__main__":
    main()

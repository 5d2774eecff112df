"""Secret redaction for everything qlora-watch writes or shows (logs, state, status, TUI)."""

from __future__ import annotations

import re

MASK = "***"

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Hugging Face tokens: hf_ + 30 or more alphanumerics
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), MASK),
    # AWS access key ids
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),
    # NAME_TOKEN=value, NAME_KEY=value, *SECRET*=value, *PASSWORD*=value (env dumps, argv)
    (
        re.compile(
            r"\b([A-Za-z0-9_]*(?:TOKEN|_KEY|SECRET|PASSWORD|PASSWD)[A-Za-z0-9_]*)"
            r"(\s*[=:]\s*)(['\"]?)([^\s'\",;]+)",
            re.IGNORECASE,
        ),
        r"\1\2\3" + MASK,
    ),
    # --hub_token X / --hub-token=X / --api-key X
    (
        re.compile(r"(--[A-Za-z0-9_-]*(?:token|key|secret|password)[A-Za-z0-9_-]*)(=|\s+)(\S+)", re.IGNORECASE),
        r"\1\2" + MASK,
    ),
    # a quoted key, as in a dict repr, JSON or an argv list: {'hub_token': 'x'}, ["--api-key", "x"]
    (
        re.compile(
            r"""(['"])((?:[A-Za-z0-9_-]*(?:token|[_-]key|apikey|secret|password|passwd)[A-Za-z0-9_-]*)|key)\1"""
            r"""(\s*[:=,]\s*)(['"])[^'"]*\4""",
            re.IGNORECASE,
        ),
        r"\1\2\1\3\4" + MASK + r"\4",
    ),
    # Authorization: Bearer xxx
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE), r"\1" + MASK),
]

# A bare 40-hex string right after "wandb" (WANDB_API_KEY values printed alone).
_WANDB = re.compile(r"(wandb[^\n]{0,40}?)\b[0-9a-f]{40}\b", re.IGNORECASE)


def redact(text: str) -> str:
    """Mask tokens, keys and passwords in a line of text."""
    if not text:
        return text
    for pat, repl in _PATTERNS:
        text = pat.sub(repl, text)
    return _WANDB.sub(r"\1" + MASK, text)


def redact_argv(argv: list[str]) -> list[str]:
    """Mask the value that follows a secret-looking flag, and secret-looking NAME=value items."""
    out: list[str] = []
    hide_next = False
    for a in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        if re.fullmatch(r"--?[A-Za-z0-9_-]*(token|key|secret|password)[A-Za-z0-9_-]*", a, re.IGNORECASE):
            out.append(a)
            hide_next = True
            continue
        out.append(redact(a))
    return out

"""Make a trainer log line safe to show: no terminal escapes, no control characters."""

from __future__ import annotations

import re

# A trainer (or anything it imports) can print escape sequences: OSC 52 writes the user's
# clipboard, OSC 0 retitles the window, CSI 2J clears the screen. None of them may reach the
# terminal through the dashboard, so every ESC sequence is removed, 7-bit and 8-bit forms.
_ESCAPES = re.compile(
    r"""
      (?:\x1b\]|\x9d) [^\x07\x1b\x9c]* (?:\x07|\x1b\\|\x9c|$)      # OSC ... BEL/ST (or cut off)
    | (?:\x1b[P^_X]|[\x90\x98\x9e\x9f]) [^\x1b\x9c]* (?:\x1b\\|\x9c|$)  # DCS, SOS, PM, APC ... ST
    | (?:\x1b\[|\x9b) [0-?]* [ -/]* [@-~]?                          # CSI params intermediates final
    | \x1b [ -/]* [0-~]?                                           # other ESC sequences (nF, Fp, Fe, Fs)
    """,
    re.VERBOSE,
)
# C0 controls (tab is expanded first), DEL and C1 controls; also the bidi overrides and
# isolates that reorder what the eye sees ("Trojan Source").
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Lone surrogates (from surrogateescape-decoded bytes) cannot be encoded to the terminal.
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def sanitize(line: str) -> str:
    """Return `line` with escape sequences and control characters removed, tabs expanded."""
    if "\r" in line:
        # tqdm redraws with carriage returns: a terminal would show the last segment only.
        parts = [p for p in line.split("\r") if p]
        line = parts[-1] if parts else ""
    line = _ESCAPES.sub("", line)
    line = line.expandtabs(4)
    return _SURROGATES.sub("\ufffd", _CONTROLS.sub("", line))

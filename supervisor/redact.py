"""Secret redaction for everything qlora-watch writes or shows (logs, state, status, TUI).

Two ways a secret is found, and one rule that a metric is never one:

- **by the value's shape**, wherever it stands: Hugging Face `hf_…`, GitHub `ghp_…`/`github_pat_…`,
  GitLab, OpenAI/Anthropic `sk-…`, Slack `xox?-…`, Google `AIza…`, AWS key ids, npm/PyPI tokens,
  JWTs, `Bearer …`, a password in any URL (`scheme://user:pass@`), an apprise URL
  (`discord://id/TOKEN`, `slack://…`, `tgram://…`), Slack/Discord webhook URLs, a W&B key;
- **by the key's name**, in `NAME=value`, `name: value`, `'name': 'value'` and `--name value`:
  a name whose last word is `token`/`key`/`apikey`/`pat`, or with a word `secret`/`password`/
  `passwd`/`credentials` (`HF_TOKEN`, `hub_token`, `OPENAI_API_KEY`, `DB_PASSWORD`);
- **never a metric or an argument**: `num_tokens`, `mean_token_accuracy`,
  `train_tokens_per_second`, `max_new_tokens`, `--tokenizer_name`, `pad_token`, `eos_token_id`
  are names of words `tokens`/`tokenizer`/`id` or of a tokenizer's special tokens, and a plain
  number after a token/key name is a count, not a secret.
"""

from __future__ import annotations

import re

MASK = "***"

# -- shapes ------------------------------------------------------------------------------
_SHAPES: list[re.Pattern[str]] = [re.compile(p) for p in (
    r"\bhf_[A-Za-z0-9]{30,}\b",  # Hugging Face
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",  # GitHub classic, OAuth, user, server, refresh
    r"\bgithub_pat_[A-Za-z0-9_]{22,}\b",  # GitHub fine-grained
    r"\bglpat-[A-Za-z0-9_-]{20,}",  # GitLab
    r"\bsk-(?:proj-|ant-(?:api\d+-)?)?[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google API key
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",  # AWS access key id
    r"\bnpm_[A-Za-z0-9]{36}\b",
    r"\bpypi-[A-Za-z0-9_-]{50,}",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # a JWT
)]
_SUBS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE), r"\1" + MASK),
    # apprise URLs carry their secrets in the path: discord://id/TOKEN, slack://A/B/C, tgram://BOT/chat
    (re.compile(r"\b((?:discord|slack|tgram|telegram|pover|pushover|pbul|msteams|gotifys?|ntfys?|"
                r"matrixs?|mailtos?|pushed|join|ifttt|signals?|twilio|rocket|rockets|mmosts?|zulip|"
                r"lametric|opsgenie|pagerduty|spush|apprises?|jsons?|xmls?|forms?)://)[^\s'\"<>]+",
                re.IGNORECASE), r"\1" + MASK),
    # webhooks as https URLs
    (re.compile(r"(hooks\.slack\.com/services/)[^\s'\"<>]+"), r"\1" + MASK),
    (re.compile(r"(discord(?:app)?\.com/api/webhooks/)[^\s'\"<>]+"), r"\1" + MASK),
    # user:password@ in any URL
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@'\"]+:)[^\s/@'\"]+@"), r"\1" + MASK + "@"),
    # a bare 40-hex string right after "wandb" (WANDB_API_KEY values printed alone)
    (re.compile(r"(wandb[^\n]{0,40}?)\b[0-9a-f]{40}\b", re.IGNORECASE), r"\1" + MASK),
    (re.compile(r"(-----BEGIN [A-Z ]*PRIVATE KEY-----).*?(-----END [A-Z ]*PRIVATE KEY-----|$)",
                re.DOTALL), r"\1" + MASK + r"\2"),
]

# -- names -------------------------------------------------------------------------------
_ANYWHERE = {"secret", "password", "passwd", "passphrase", "credential", "credentials", "pwd"}
_LAST = {"token", "key", "apikey", "pat", "accesskey", "secretkey", "privatekey"}
# a tokenizer's special tokens and other `*_token` that name text, not a credential
_NOT_TOKEN = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "first",
              "last", "next", "prev", "new", "image", "audio", "video", "vision", "boi", "eoi",
              "sot", "eot", "fim", "think", "response", "instruction", "chat", "default", "added",
              "split", "stop", "query", "prompt", "assistant", "user", "system", "generation"}
# `*_key` that names a field, not a credential
_NOT_KEY = {"sort", "primary", "foreign", "cache", "metric", "dict", "group", "partition", "hash",
            "lookup", "map", "index", "column", "label", "text", "input", "output", "dataset",
            "data", "image", "prompt", "response", "message", "messages", "content", "field",
            "target", "model", "config", "layer", "state", "module", "param", "name", "monitor",
            "chosen", "rejected", "completion", "conversation", "conversations", "role"}
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?%?")


def _words(name: str) -> list[str]:
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.lstrip("-"))  # apiKey -> api_Key
    return [w for w in re.split(r"[_.\-\s]+", name.lower()) if w]


def secret_name(name: str) -> bool:
    """Whether a key or flag names a credential (table-tested in test_reliability_machines)."""
    words = _words(name)
    if not words:
        return False
    if _ANYWHERE.intersection(words):
        return True
    last = words[-1]
    if last not in _LAST:
        return False
    before = words[-2] if len(words) > 1 else None
    if last == "token" and before in _NOT_TOKEN:
        return False
    if last == "key" and (before is None or before in _NOT_KEY):
        return False  # `key` alone (dict keys, "key: loss") is a word, not a credential
    return True


def _masks(name: str, value: str) -> bool:
    if not value or value == MASK or not secret_name(name):
        return False
    # a count after a token/key name (`token: 42`) is a metric; a numeric password is still one
    return not (_NUMBER.fullmatch(value.strip("'\"")) and not _ANYWHERE.intersection(_words(name)))


# 'name': 'value' / "name": "value" (dict reprs, JSON, an argv list's "--flag", "value")
_QUOTED = re.compile(r"""(['"])(--?[A-Za-z][\w.-]*|[A-Za-z_][\w.-]*)\1(\s*[:=,]\s*)(['"])([^'"\n]*)\4""")
# --name value / --name=value
_FLAG = re.compile(r"""(?<![\w-])(--[A-Za-z][\w-]*)(=|\s+)(['"]?)([^\s'"]+)""")
# NAME=value, name: value (env dumps, YAML, query strings)
_PLAIN = re.compile(r"""(?<![\w-])([A-Za-z_][\w.-]*)(\s*[=:]\s*)(['"]?)([^\s'",;&)}\]]+)""")


def _quoted(m: re.Match[str]) -> str:
    q, name, sep, vq, value = m.groups()
    return f"{q}{name}{q}{sep}{vq}{MASK}{vq}" if _masks(name, value) else m.group(0)


def _flag(m: re.Match[str]) -> str:
    name, sep, vq, value = m.groups()
    if value.startswith("--") or not _masks(name, value):
        return m.group(0)
    return f"{name}{sep}{vq}{MASK}"


def _plain(m: re.Match[str]) -> str:
    name, sep, vq, value = m.groups()
    if value.startswith("//") or not _masks(name, value):  # `https://…` is a URL, not name: value
        return m.group(0)
    return f"{name}{sep}{vq}{MASK}"


def redact(text: str) -> str:
    """Mask tokens, keys and passwords in a line of text; metrics and arguments stay."""
    if not text:
        return text
    for pat in _SHAPES:
        text = pat.sub(MASK, text)
    for pat, repl in _SUBS:
        text = pat.sub(repl, text)
    text = _QUOTED.sub(_quoted, text)
    text = _FLAG.sub(_flag, text)
    return _PLAIN.sub(_plain, text)


def redact_argv(argv: list[str]) -> list[str]:
    """Mask the value that follows a secret-looking flag, and secret-looking NAME=value items."""
    out: list[str] = []
    hide_next, prev = False, ""
    for a in argv:
        if hide_next:
            out.append(a if _NUMBER.fullmatch(a) and not _ANYWHERE.intersection(_words(prev)) else MASK)
            hide_next = False
            continue
        if re.fullmatch(r"--?[A-Za-z][\w-]*", a) and secret_name(a):
            out.append(a)
            prev, hide_next = a, True
            continue
        out.append(redact(a))
    return out

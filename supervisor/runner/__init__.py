"""The trainer and its callback: the only package that imports torch, transformers, peft, trl, bitsandbytes.

Importing `supervisor.runner` is cheap; `QloraWatchCallback` (which imports transformers) is loaded
on first use:

    from supervisor.runner import QloraWatchCallback
"""

from __future__ import annotations

from typing import Any

__all__ = ["QloraWatchCallback", "EventWriter", "effective_settings"]


def __getattr__(name: str) -> Any:
    if name == "effective_settings":  # stdlib only: no transformers needed
        from supervisor.runner.settings import effective_settings

        return effective_settings
    if name in __all__:
        from supervisor.runner import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'supervisor.runner' has no attribute {name!r}")

"""Config and data errors are classified as not retryable (the end-to-end runs: tests/e2e/test_config_errors.py)."""

from __future__ import annotations

import pytest

from supervisor.guards.classify import CONFIG_ERROR, classify_exit


@pytest.mark.parametrize("last", [
    "supervisor.runner.data.DataError: /d/garbage.jsonl:201:1: invalid JSON: Expecting value",
    "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)",
    "TypeError: SFTConfig.__init__() got an unexpected keyword argument 'max_seq_length'",
    "OSError: nope/model is not a local folder and is not a valid model identifier listed on "
    "'https://huggingface.co/models'",
    "huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error.",
    "FileNotFoundError: [Errno 2] No such file or directory: 'data/train.jsonl'",
])
def test_config_and_data_errors_are_not_retryable(last: str) -> None:
    tail = ["  0%|          | 0/60 [00:00<?, ?it/s]Traceback (most recent call last):",
            '  File "train.py", line 3, in <module>', last]
    cls = classify_exit(returncode=1, signal=None, stderr_tail=tail)
    assert cls.kind == CONFIG_ERROR and last.split(":")[0] in cls.summary


def test_argparse_rejection_is_a_config_error() -> None:
    tail = ["usage: train.py [-h] [--lr LR]", "train.py: error: unrecognized arguments: --lora_r 8"]
    cls = classify_exit(returncode=2, signal=None, stderr_tail=tail)
    assert cls.kind == CONFIG_ERROR and "unrecognized arguments" in cls.summary

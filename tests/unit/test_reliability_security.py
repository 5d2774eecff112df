"""RELIABILITY_PLAN H7 in-process: the redactor on real-looking secrets (with a real supervisor:
tests/e2e/test_reliability_security.py)."""

from __future__ import annotations

import pytest

from tests.support import (
    AWS,
    HF,
    HUB,
    WANDB,
)

pytestmark = pytest.mark.timeout(90)

# Real-looking samples (ROCm/cvs PR #323: a redaction regex that never matched anything).
REDACT = [
    (f"HF_TOKEN={HF}", HF),
    (f"export HF_TOKEN='{HF}'", HF),
    (f"token: {HF}", HF),
    (f"Authorization: Bearer {HF}", HF),
    (f"WANDB_API_KEY={WANDB}", WANDB),
    (f"wandb: Appending key for api.wandb.ai to your netrc file: {WANDB}", WANDB),
    (f"wandb login {WANDB}", WANDB),
    (f"AWS_ACCESS_KEY_ID={AWS}", AWS),
    (f"using key {AWS} for s3", AWS),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG"),
    (f"python train.py --hub_token {HUB} --push_to_hub", HUB),
    (f"python train.py --hub-token={HUB}", HUB),
    (f"OPENAI_API_KEY = {HUB}", HUB),
    (f"DB_PASSWORD: {HUB}", HUB),
    (f"MY_SECRET_THING={HUB}", HUB),
]


@pytest.mark.parametrize("line, secret", REDACT)
def test_h7_redactor_on_real_looking_samples(line: str, secret: str) -> None:
    from supervisor.redact import redact

    out = redact(line)
    assert secret not in out and "***" in out, out


def test_h7_redact_argv_and_harmless_text() -> None:
    from supervisor.redact import redact, redact_argv

    assert redact_argv(["python", "train.py", "--hub_token", HUB, "--lr", "2e-4"]) == [
        "python", "train.py", "--hub_token", "***", "--lr", "2e-4"]
    assert HUB not in " ".join(redact_argv([f"--hub-token={HUB}", f"HF_TOKEN={HF}"]))
    for harmless in ("{'loss': '1.2345', 'grad_norm': '0.5', 'learning_rate': '0.0001'}",
                     "tokens/s 3800", "max_tokens 2048", "checkpoint-500 saved"):
        assert redact(harmless) == harmless


@pytest.mark.parametrize("line", [f"{{'hub_token': '{HUB}'}}", f'{{"api_key": "{HUB}"}}',
                                  f"['--hub_token', '{HUB}']"])
def test_h7_redactor_quoted_keys(line: str) -> None:
    from supervisor.redact import redact

    assert HUB not in redact(line)

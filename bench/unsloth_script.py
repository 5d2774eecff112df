"""Unsloth's own QLoRA script, as a user writes it from Unsloth's docs, for bench/peer_speed.py.

The docs' shape: `FastLanguageModel.from_pretrained(max_seq_length, load_in_4bit=True)`, then
`FastLanguageModel.get_peft_model(r, target_modules=[the 7 projections], lora_alpha,
lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state)`, then trl's
`SFTTrainer(model, processing_class=tokenizer, train_dataset, args=SFTConfig(dataset_text_field=
"text", ...))`, padding_free left unset (Unsloth decides). For the comparison only, it takes the
recipe's hyperparameters from the command line (lr, cosine schedule, warmup ratio, paged AdamW
8-bit, seed) so that every trainer sees the same samples per step and the same update; it adds
the step-event callback all variants are timed by, and saves no checkpoint.

    python bench/unsloth_script.py --model DIR --data train.jsonl --out OUT --events ev.jsonl \\
        --seq 4096 --batch 4 --accum 4 --r 64 --steps 5
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.script_args import script_parser  # noqa: E402


def main() -> int:
    ap = script_parser()
    ap.set_defaults(steps=5)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

    # ---- Unsloth's documented script from here ----
    from unsloth import FastLanguageModel  # first, so that it patches transformers, peft and trl

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=a.model, max_seq_length=a.seq, dtype=None, load_in_4bit=True,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=a.r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=2 * a.r, lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=a.seed,
    )

    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from supervisor.runner.callback import EventWriter, QloraWatchCallback

    dataset = load_dataset("json", data_files=a.data, split="train")
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=SFTConfig(
            dataset_text_field="text", max_length=a.seq,
            per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.accum,
            warmup_steps=a.warmup, max_steps=a.steps, learning_rate=a.lr,
            logging_steps=1, optim="paged_adamw_8bit", lr_scheduler_type="cosine",
            max_grad_norm=a.max_grad_norm, seed=a.seed, output_dir=a.out, report_to="none",
            save_steps=10**6, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
        ),
        callbacks=[QloraWatchCallback(writer=EventWriter(a.events), handle_sigterm=False)],
    )
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

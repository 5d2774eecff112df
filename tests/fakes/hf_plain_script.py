#!/usr/bin/env python3
"""A plain HF Trainer + peft LoRA script on a tiny random-weight Llama: no qlora-watch import.

What a user already has, for `qlora-watch run -- python hf_plain_script.py ...`. It prints the
Trainer's own log dicts and tqdm bar, saves `checkpoint-N` in --output-dir, resumes from
--resume (or $QLW_RESUME_FROM), and saves-then-stops on SIGTERM with its own small callback
(the usual recipe for preemptible machines). --oom-above N raises a CUDA-OOM-looking error
once the sequence length is above N (a CPU rehearsal of a card that is too small).
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

STOP = {"asked": False}


class SaveOnSigterm(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if STOP["asked"]:
            control.should_save = True
            control.should_training_stop = True
        return control


class OomAbove(TrainerCallback):
    """A real torch.OutOfMemoryError after the first checkpoint, while seq_len is too long."""

    def __init__(self, seq_len: int, limit: int | None, at: int) -> None:
        self.seq_len, self.limit, self.at = seq_len, limit, at

    def on_step_begin(self, args, state, control, **kwargs):
        if self.limit is not None and self.seq_len > self.limit and state.global_step >= self.at:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (seq_len {self.seq_len} > {self.limit})")
        return control


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--save-steps", type=int, default=5)
    ap.add_argument("--seq-len", default=None, help="default: $QLW_MAX_SEQ_LEN, else 64")
    ap.add_argument("--resume", default=None, help="a checkpoint folder ('' for none)")
    ap.add_argument("--oom-above", type=int, default=None)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: STOP.update(asked=True))
    seq_len = int(args.seq_len or os.environ.get("QLW_MAX_SEQ_LEN") or 64)
    resume = args.resume if args.resume is not None else os.environ.get("QLW_RESUME_FROM")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    model = LlamaForCausalLM(config)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    n = min(seq_len, 32)  # the samples stay short: the length only decides the fake OOM
    rows = [{"input_ids": [(i * 7 + j) % 128 for j in range(n)],
             "labels": [(i * 7 + j) % 128 for j in range(n)]} for i in range(64)]
    targs = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps,
                              save_steps=args.save_steps, logging_steps=1, per_device_train_batch_size=4,
                              learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="steps",
                              dataloader_num_workers=0)

    class Slow(TrainerCallback):
        def on_step_end(self, a, s, c, **k):
            time.sleep(args.step_sleep)
            return c

    trainer = Trainer(model=model, args=targs, train_dataset=rows,
                      callbacks=[SaveOnSigterm(), OomAbove(seq_len, args.oom_above, args.save_steps), Slow()])
    trainer.train(resume_from_checkpoint=resume or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

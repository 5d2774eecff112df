"""The source article's training script (train_70b_qlora.py), ported to current APIs and
nothing else, for the speed comparison in bench/gpu_suite.py (phase `speed`).

What changed, and why (each one a TypeError or ValueError on transformers 5 / trl 1.16):
  - SFTConfig(max_seq_length=...)     -> max_length
  - SFTConfig(warmup_ratio=0.05)      -> warmup_steps=0.05 (a float below 1 is a ratio)
  - SFTTrainer(tokenizer=tok)         -> processing_class=tok
  - SFTTrainer(peft_config=...) with a model that get_peft_model already wrapped -> dropped
    (trl 1.16 refuses a PeftModel together with a peft_config)
  - gradient_checkpointing*           -> activation_checkpointing* where transformers renamed it
  - attn_implementation="flash_attention_2" -> "sdpa" (flash-attn is not installed on the bench
    machine; our trainer uses sdpa too, so both sides run the same attention)
For the benchmark only: model, data, sequence length, batch, accumulation, rank and step count
come from the command line (the 8B column of the article's table), logging every step, the
number of non-padding tokens counted, and the same step-event callback our trainer uses so
both sides are timed by the same code. No checkpoint is saved (save_steps beyond max_steps).

    python bench/article_port.py --model DIR --data train.jsonl --out OUT --events ev.jsonl \\
        --seq 4096 --batch 4 --accum 4 --r 64 --steps 3
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.script_args import script_parser  # noqa: E402


def main() -> int:
    a = script_parser().parse_args()

    # ---- the article's script from here, with the renames listed above ----
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from supervisor.runner.callback import EventWriter, QloraWatchCallback

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype="bfloat16", bnb_4bit_use_double_quant=True,
    )

    tok = AutoTokenizer.from_pretrained(a.model)
    tok.pad_token = tok.eos_token

    model = AutoModelForCausalLM.from_pretrained(
        a.model,
        quantization_config=bnb_config, device_map="auto",
        attn_implementation="sdpa",
    )
    model = prepare_model_for_kbit_training(model)
    model.gradient_checkpointing_enable()

    peft_config = LoraConfig(r=a.r, lora_alpha=2 * a.r,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                             bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_config)

    ds = load_dataset("json", data_files=a.data, split="train")

    import torch

    on_cpu = {} if torch.cuda.is_available() else {"use_cpu": True}  # the CPU smoke test only
    fields = getattr(SFTConfig, "__dataclass_fields__", {})
    ck = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    training_args = SFTConfig(
        output_dir=a.out, num_train_epochs=2, max_steps=a.steps,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.accum,
        learning_rate=a.lr, bf16=True, optim="paged_adamw_8bit",
        **{ck: True, f"{ck}_kwargs": {"use_reentrant": False}},
        max_grad_norm=a.max_grad_norm, max_length=a.seq,
        logging_steps=1, save_steps=10**6, save_total_limit=3,
        warmup_steps=a.warmup, lr_scheduler_type="cosine",
        report_to="tensorboard", include_num_input_tokens_seen="non_padding", disable_tqdm=True,
        **on_cpu,
    )

    watch = QloraWatchCallback(writer=EventWriter(a.events), handle_sigterm=False)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds,
                         args=training_args, callbacks=[watch])
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

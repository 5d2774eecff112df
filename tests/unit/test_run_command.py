"""`qlora-watch run -- COMMAND` in-process: the axolotl rewrite, trainer log lines, the settings helper.
(Real trainers under the supervisor: tests/e2e/test_run_command.py.)"""

from __future__ import annotations

from pathlib import Path


def test_axolotl_rewrite_of_every_documented_key() -> None:
    from supervisor.daemon.handoff import rewrite_axolotl
    from supervisor.recipe import apply_rung, validate

    base = validate({"trainer": {"command": ["axolotl", "train", "x.yml"], "output_dir": "/o"},
                     "train": {"max_seq_len": 2048, "per_device_batch": 4, "grad_accum": 2},
                     "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}})
    keys = {"train.max_seq_len", "lora.r", "lora.alpha", "lora.target_modules",
            "train.per_device_batch", "train.grad_accum"}
    r = apply_rung(apply_rung(base, {"train.per_device_batch": 1}), {"lora.target_modules": ["q_proj", "v_proj"]})
    out = rewrite_axolotl({"sequence_len": 2048, "lora_target_linear": True}, r, keys, "/o/checkpoint-9", Path("/o"))
    assert out == {"sequence_len": 2048, "lora_r": 16, "lora_alpha": 32, "lora_target_linear": False,
                   "lora_target_modules": ["q_proj", "v_proj"], "micro_batch_size": 1,
                   "gradient_accumulation_steps": 8, "resume_from_checkpoint": "/o/checkpoint-9",
                   "output_dir": "/o"}
    out = rewrite_axolotl({"lora_target_modules": ["q_proj"]}, base, keys, None, Path("/o"))
    assert out["lora_target_linear"] is True and "lora_target_modules" not in out


def test_log_lines_give_steps_loss_and_total() -> None:
    from supervisor.daemon.logprogress import LogProgress, parse_bar, parse_dict

    got = parse_dict("{'loss': '10.78', 'grad_norm': '0.2812', 'learning_rate': '1e-04', 'epoch': '0.1'}")
    from supervisor.records import Step

    step = Step.from_trainer({"step": 3, **got}, attempt=1)  # the one translator every source goes through
    assert (step.loss, step.grad_norm, step.lr, step.epoch, step.tokens) == (10.78, 0.2812, 1e-4, 0.1, None)
    assert parse_dict("{'loss': 1.5, 'learning_rate': 2e-05, 'epoch': 0.5}")["loss"] == 1.5  # transformers 4
    assert parse_dict("{'train_runtime': '0.1', 'train_loss': '4.84', 'epoch': '0.5'}") is None
    assert parse_dict("{'loss': __import__('os')}") is None  # literal_eval only
    assert parse_bar(" 12%|█▏        | 7/60 [00:03<00:25,  2.10it/s]") == (7, 60)
    assert parse_bar("step 7/60 done") is None
    lp = LogProgress()
    got = lp.feed([" 0%|  | 0/8 [00:00<?, ?it/s]", "{'loss': '4.8', 'epoch': '0.1'}",
                   " 12%|█ | 1/8 [00:00<00:01, 5.0it/s]"], now=100.0)
    assert [(r["step"], r["loss"], r["max_steps"]) for r in got] == [(1, "4.8", 8)]
    # resumed from a checkpoint already at max_steps, the HF Trainer takes one more step and
    # draws it without a total ("25it"): the loss is step 25's, never the "0/24" bar's
    assert parse_bar("25it [00:00, 224.89it/s]") == (25, None)
    assert parse_bar("Loading weights: 291it [00:00, 900.1it/s]") is None
    lp = LogProgress()
    got = lp.feed(["  0%|          | 0/24 [00:00<?, ?it/s]", "25it [00:00, 224.89it/s]              ",
                   "{'loss': '4.834', 'learning_rate': '0', 'epoch': '1.562'}", "25it [00:00, 224.89it/s]"],
                  now=100.0)
    assert [(r["step"], r["max_steps"]) for r in got] == [(25, 25)]


def test_effective_settings_helper_reads_the_env() -> None:
    from supervisor.runner.settings import effective_settings

    s = effective_settings({"QLW_MAX_SEQ_LEN": "768", "QLW_TARGET_MODULES": "q_proj,v_proj",
                            "QLW_RESUME_FROM": "/o/checkpoint-5", "QLW_ATTEMPT": "2", "QLW_RUNG": "1"})
    assert s["max_seq_len"] == 768 and s["lora_r"] is None and s["target_modules"] == ["q_proj", "v_proj"]
    assert (s["resume_from"], s["attempt"], s["rung"]) == ("/o/checkpoint-5", 2, 1)
    assert effective_settings({})["resume_from"] is None

"""qlora-watch: a supervisor and terminal dashboard for long QLoRA fine-tuning runs."""

__version__ = "0.1.0"

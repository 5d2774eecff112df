.PHONY: setup setup-train test test-fast check bench schema
# Everything the tests need ([test] pulls in [train,report,notify,wandb,mlflow]).
setup:
	python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e '.[test]'
# Only what training needs: the README's first quick-start command.
setup-train:
	python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e '.[train]'
# All tests (what CI runs, the README's command): unit, tui, e2e (real processes), gpu (skipped without one).
test:
	.venv/bin/python -m pytest -q
# The pure and in-process tests (tests/unit, tests/tui), one worker per core where pytest-xdist
# is installed ([test] has it), a file per worker (its module fixtures built once): under a minute on 2 cores.
XDIST := $(shell .venv/bin/python -c 'import xdist' 2>/dev/null && echo '-n auto --dist loadfile')
test-fast:
	.venv/bin/python -m pytest -q $(XDIST) tests/unit tests/tui
# Lint, and the import boundaries between the core, the dashboard and the trainer side.
check:
	.venv/bin/ruff check supervisor tests bench
	.venv/bin/lint-imports
bench:
	.venv/bin/python bench/telemetry_cost.py --seconds 20
	.venv/bin/python bench/tui_first_frame.py
# The recipe's JSON Schema, from the pydantic model (tests/unit/test_packaging.py checks it is current).
schema:
	.venv/bin/python -m supervisor recipes schema > docs/recipe.schema.json

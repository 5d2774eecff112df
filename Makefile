.PHONY: setup setup-train test check bench schema
# Everything the tests need ([test] pulls in [train,report,notify,wandb,mlflow]).
setup:
	python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e '.[test]'
# Only what training needs: the README's first quick-start command.
setup-train:
	python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e '.[train]'
test:
	.venv/bin/python -m pytest -q
check:
	.venv/bin/ruff check supervisor tests bench
bench:
	.venv/bin/python bench/telemetry_cost.py --seconds 20
	.venv/bin/python bench/tui_first_frame.py
# The recipe's JSON Schema, from the pydantic model (tests/test_packaging.py checks it is current).
schema:
	.venv/bin/python -m supervisor recipes schema > docs/recipe.schema.json

.PHONY: setup test check bench
setup:
	python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e '.[test]'
test:
	.venv/bin/python -m pytest -q
check:
	.venv/bin/ruff check supervisor tests bench
bench:
	.venv/bin/python bench/telemetry_cost.py --seconds 20
	.venv/bin/python bench/tui_first_frame.py

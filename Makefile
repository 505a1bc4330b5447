# The two commands of the README. Each one sets up .venv first (idempotent).
.PHONY: setup train test test-fast

setup:
	@bash scripts/setup.sh

train: setup
	.venv/bin/online-dpo train $(ARGS)

test: setup
	.venv/bin/python -m pytest -q $(ARGS)

test-fast: setup
	.venv/bin/python -m pytest -q -m "not ray and not e2e" $(ARGS)

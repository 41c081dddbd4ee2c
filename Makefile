# Two entry points for a fresh clone (nothing needed but Python 3.10+): both create .venv once.
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/sae-steer demo

test: setup
	.venv/bin/python -m pytest -q

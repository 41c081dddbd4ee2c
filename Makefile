# Two entry points for a fresh clone (nothing needed but Python 3.10+): both create .venv once.
.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/sae-steer demo

# The kernel tests need Triton's interpreter switched on before triton is imported, which vLLM
# does at import: they get their own pytest process. The slowest tests are listed at the end (the suite
# must stay under 40 minutes on a 2-core AVX2 machine).
test: setup
	@bash scripts/setup_browser.sh
	TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels
	.venv/bin/python -m pytest -q --durations=15 --ignore=tests/kernels

bench: setup
	.venv/bin/python benchmarks/throughput.py

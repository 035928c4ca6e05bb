# The two entry points the README starts with.
.PHONY: setup run test bench
setup:
	scripts/setup.sh
run: setup
	.venv/bin/adapterkit demo
	.venv/bin/adapterkit serve
test: setup
	.venv/bin/python -m pytest -q
bench: setup
	.venv/bin/python benchmarks/mixed_batch.py

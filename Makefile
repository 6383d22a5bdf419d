# The two commands in the README: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: demo test lint bench bench-quick install-test

demo:
	$(PYTHON) -m pip install -q -e .
	$(PYTHON) examples/demo.py

install-test:
	$(PYTHON) -m pip install -q -e '.[test,all]'
	bash .ci/install-debian-packages chromium parallel

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

# .ci/pythons.py --lint: the lint above, then pytest here and beside it on the other
# CPythons present (their installs start first, while the lint runs)
test: install-test
	$(PYTHON) .ci/pythons.py --lint

# Every benchmark module, each against its anchor in the same run (README, Performance).
BENCHMARKS = run executors semantics coordination durable futures dask cli web

bench:
	$(PYTHON) -m pip install -q -e '.[bench]'
	bash .ci/install-debian-packages parallel
	status=0; for m in $(BENCHMARKS); do $(PYTHON) -m benchmarks.$$m || status=1; done; exit $$status

bench-quick:
	$(PYTHON) -m benchmarks.run --quick

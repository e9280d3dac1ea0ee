# The two commands the README starts with: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need; torch is pinned to the CPU wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench bench-quick bench-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[models,dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

test: lint
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# The linter, the formatter's check and the type checker (graphopt/ and backends/, see pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check graphopt passes backends tests benchmarks
	$(BIN)/ruff format --check graphopt passes backends tests benchmarks
	$(BIN)/mypy

# The suite: every graphopt mode against every anchor on every model, one table (results/suite.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/suite.py --quick

# The focused benchmarks, each with its own results file.
bench-all: $(STAMP)
	$(BIN)/python benchmarks/bench_corpus.py
	$(BIN)/python benchmarks/bench_cleanup.py
	$(BIN)/python benchmarks/bench_large_model.py
	$(BIN)/python benchmarks/bench_fusion.py
	$(BIN)/python benchmarks/bench_quantize_dynamic.py
	$(BIN)/python benchmarks/bench_quantize_static.py
	$(BIN)/python benchmarks/bench_quantize_int4.py
	$(BIN)/python benchmarks/bench_prune.py

clean:
	rm -rf $(VENV) build *.egg-info benchmarks/results/tmp

# The two commands the README starts with: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need; torch is pinned to the CPU wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[models,dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

test: $(STAMP)
	$(BIN)/ruff check graphopt passes backends tests benchmarks
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check graphopt passes backends tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_corpus.py
	$(BIN)/python benchmarks/bench_cleanup.py
	$(BIN)/python benchmarks/bench_large_model.py
	$(BIN)/python benchmarks/bench_fusion.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench_cleanup.py --quick
	$(BIN)/python benchmarks/bench_fusion.py --quick

clean:
	rm -rf $(VENV) build *.egg-info benchmarks/results/tmp

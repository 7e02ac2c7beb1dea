# Two entry points for a fresh machine with only Python 3.10+:
#   make demo  — install into .venv, train the digits quickstart, sample a grid
#   make test  — install into .venv with test extras, check the import layers and ruff, run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
RUN    ?= runs/digits

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python train.py --config=configs/edm.py:digits --workdir=$(RUN)
	$(BIN)/python sample.py --workdir=$(RUN) --seeds=0-99 --out=$(RUN)/final
	$(BIN)/python evaluate.py digits --workdir=$(RUN)

# The layers contract (pyproject's [tool.importlinter]) and ruff first: a crossed layer fails fast.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: $(VENV)/.installed
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check diffjax configs tests benchmarks scripts train.py sample.py evaluate.py distill.py

# The PyTorch reference side: torch + diffusers, and k-diffusion's sampler module on its own
# (its package imports torchvision, which has no CPU build here; see benchmarks/bench_torch.py).
bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m pip install --quiet --no-deps k-diffusion==0.1.1.post1
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .jax_cache

# Two entry points, both self-contained from a clean clone:
#   make demo   set up .venv, then run the whole pipeline on the bundled sample (CPU, no download):
#               prepare -> tiny model -> SFT -> reward model -> PPO -> evaluation report, all under
#               runs/tiny/ (scripts/run_pipeline.py; a re-run reuses complete stages, ARGS=--force redoes)
#   make test   set up .venv, then run the test suite
#
# Setup installs torch first, pinned to TORCH_SPEC, so that pip does not pick a
# multi-GB build you did not ask for. On a GPU box the same pin pulls the CUDA wheel
# from PyPI; override it for another CUDA index, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# A torch already importable in the venv is kept as it is.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/tiny
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/run_pipeline.py --config configs/pipeline/tiny.yaml --output_dir $(RUN_DIR) $(ARGS)

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs

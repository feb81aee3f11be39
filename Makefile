# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
# The exact torch/torchvision this project is tested with (pyproject.toml keeps ranges loose).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile $(TORCH_PINS) -e '.[dev,export]'
	PYTHONDONTWRITEBYTECODE= $(PY) scripts/compile_imports.py  # what runs import, compiled once: the script says why
	touch $@

data: install
	$(PY) scripts/make_synthetic.py imagenet --out $(DATA)/imagenet

# ends with the run's summary (run directory, final and best top-1 with their epochs, best checkpoint)
demo: data
	$(PY) -m vtrain experiment=quickstart data.root=$(DATA)/imagenet hydra.run.dir=outputs/quickstart

# --dist loadgroup: tests that share an expensive module fixture (@pytest.mark.xdist_group) run on one worker
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

clean:
	rm -rf outputs multirun data/synthetic .pytest_cache

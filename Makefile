# Set-up and entry points. Every target creates .venv and installs the project into it first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q

.PHONY: demo test test-fast install clean reproduce

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# writes output/demo (ignored by git), replacing the previous demo's files
demo: $(VENV)/.installed
	$(PY) examples/demo.py

# base vs Sila on CIFAR-10 (../shared/data/cifar10): the converged test_resnet protocol, 5 seeds (resumable)
reproduce: $(VENV)/.installed
	$(PY) benchmarks/reproduce_cifar10.py --protocol small --out output/reproduce_small

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# development loop: leaves out the tests marked slow (defined by the marker in pyproject.toml); `make test` and CI
# run everything
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache output/demo

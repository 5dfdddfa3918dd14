# The two commands a new machine needs: `make install`, then `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

.PHONY: install test clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'

test:
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info server/*.egg-info

# Two commands do everything on a fresh machine with only python3:
#   make demo   the whole ZeroSeg loop on the offline default
#   make test   the test suite
# Each first creates/updates .venv from requirements.lock (pinned, reproducible).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test test-slow install

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zeroseg demo

# The default run skips tests marked slow (kill-and-resume of real jobs); CI runs those too.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

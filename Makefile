# Two commands do everything on a fresh machine with only python3:
#   make demo   the whole ZeroSeg loop on the offline default
#   (make quality: the same loop with a real budget, 3 seeds, <= 60 min)
#   make test   the test suite
# Each first creates/updates .venv from requirements.lock (pinned, reproducible).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: demo quality test test-slow install

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zeroseg demo

# The student with a real budget: a longer-trained toy teacher, more scenes and steps, 3 seeds
# (<= 60 min on 2 cores); its own folder, reused on a second run.
quality: $(STAMP)
	$(BIN)/zeroseg demo --preset quality --out quality-out

# The default run skips tests marked slow (kill-and-resume of real jobs); CI runs those too.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv here if missing and installs the pinned dependencies into it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# DeepSpeed ships as an sdist whose build imports torch: build against the torch above.
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/rlipv2 demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs build *.egg-info

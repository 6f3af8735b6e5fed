# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv here if missing and installs the tested versions (constraints.txt) into it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test venv constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel
	$(PIP) install -q -c constraints.txt torch torchvision
	# DeepSpeed ships as an sdist whose build imports torch: build against the torch above.
	$(PIP) install -q --no-build-isolation -c constraints.txt -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/rlipv2 demo --out runs/demo

# Lint (ruff), a basic type check of the library (mypy, pyproject's [tool.mypy]), then the tests
# (the import-layer check is one of them: tests/test_layers.py).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

# Pin what this venv holds (after `make test` passed with it) as the tested versions.
constraints: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude rlipv2-scale | grep -v '^[#-]'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf runs build *.egg-info

# Two commands: `make test` and `make demo`. Both create .venv if missing and install the
# project with the pinned constraints; a stamp keyed on pyproject.toml + constraints.txt
# makes a second call skip the install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)

.PHONY: install check test test-cluster lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,export,cluster]'
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

# the fast tier, for an answer while editing (under 3 minutes on 2 cores): lint and the tests
# that start no Ray cluster, no server and no browser (tests/conftest.py marks those from their
# code) and the few marked slow by hand; `make test` runs them all
check: lint
	$(VENV)/bin/pytest -q -m "not ray and not server and not browser and not launch and not slow"

# the tests of several nodes (root; about 36 minutes): sweeps over a head and a worker with their
# own filesystems, `ray up cluster.yaml` on two hosts built from Linux namespaces, and drivers
# and trials killed and interrupted on one machine, and the whole quickstart (outside `make
# test`'s 12 minutes)
test-cluster: install
	$(VENV)/bin/pytest -q -m launch tests  # by the marker alone: a launch test in any file runs

demo: install
	$(PY) -m segtune.run sweeps/quickstart.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

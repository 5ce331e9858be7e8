# The two commands a new user needs: `make run` and `make test` (see README.md).
PYTHON ?= $(shell scripts/find-python)
VENV := .venv
CONFIG ?= config/gateway.yaml

.PHONY: run test bench clean install uninstall bundle deb

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { scripts/find-python; exit 1; }
	@echo "using $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	@touch $@

run: $(VENV)/.installed
	$(VENV)/bin/gateway run -c $(CONFIG)

# Two test modules at a time (pytest-xdist, a module's tests kept together with their shared gateway),
# then the modules marked `alone` (they bound the CPU a gateway spends, which another module's load
# inflates) with nothing beside them. TEST_JOBS=0 runs everything one module at a time.
TEST_JOBS ?= 2

test: $(VENV)/.installed
	scripts/system-deps
	$(VENV)/bin/python -m pytest -n $(TEST_JOBS) --dist loadfile -m "not alone" $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest -m alone $(PYTEST_ARGS) || test $$? -eq 5  # 5: PYTEST_ARGS chose none of them

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/proxy.py

install:
	PREFIX=$(or $(PREFIX),/opt/gateway) CONFDIR=$(or $(CONFDIR),/etc/gateway) scripts/install

uninstall:
	PREFIX=$(or $(PREFIX),/opt/gateway) CONFDIR=$(or $(CONFDIR),/etc/gateway) scripts/uninstall

# The offline bundle (and the Debian package made from it) for the Python given as PYTHON=
# (default: the newest found here); see docs/deploy.md.
bundle:
	PYTHON=$(PYTHON) scripts/bundle

deb: bundle
	scripts/deb

clean:
	rm -rf $(VENV) state dist

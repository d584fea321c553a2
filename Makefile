# snapkernel: `make run` starts JupyterLab with an embedded backend; `make test` runs every test.
# Both begin with `make install`, which sets up .venv/ (quick when nothing changed) with the versions
# pinned in constraints.txt; `make lock` refreshes those pins (then runs the tests against them).

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.snapkernel-installed
SOURCES := pyproject.toml constraints.txt labextension/package.json labextension/package-lock.json \
           $(wildcard labextension/src/*.ts labextension/style/*)
ROOT    := $(shell [ "$$(id -u)" = 0 ] && echo yes)

.PHONY: install run test lint proto clean lock check-python

install: $(STAMP)

# The Python versions snapkernel supports (README); CI runs the machine's python3 through this check.
check-python:
	@python3 -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v <= (3, 13) else \
	  f"snapkernel needs Python 3.11, 3.12 or 3.13; python3 here is {sys.version.split()[0]}: install one of " \
	  "those and put it first on PATH")'

$(STAMP): $(SOURCES) scripts/install-runsc.sh | check-python
	@scripts/install-runsc.sh
	@command -v npm >/dev/null || { \
	  if [ -n "$(ROOT)" ]; then apt-get update -q && apt-get install -y -q nodejs npm; \
	  else echo "npm is missing: run 'sudo apt-get install nodejs npm' and try again" >&2; exit 1; fi; }
	@# Chromium drives the browser tests (tests/ui) through Playwright; no browser is downloaded.
	@command -v chromium >/dev/null || { \
	  if [ -n "$(ROOT)" ]; then apt-get update -q && apt-get install -y -q chromium; \
	  else echo "chromium is missing: the browser tests will skip; 'sudo apt-get install chromium' runs them" >&2; fi; }
	@[ -x $(PY) ] || python3 -m venv $(VENV) || { \
	  echo "python3 -m venv failed: on Debian run 'sudo apt-get install python3-venv'" >&2; exit 1; }
	$(PY) -m pip install -q --upgrade -c constraints.txt pip
	@# The build hook skips npm when a bundle exists: drop it so changed sources are rebuilt.
	rm -rf snapkernel/labextension
	$(PY) -m pip install -q -c constraints.txt --build-constraint constraints.txt -e ".[test,dev,cluster]"
	@touch $(STAMP)

run: install
	$(VENV)/bin/snapkernel lab $(ARGS)

# lint-imports checks the layers and that no imports go round in a cycle (the contracts in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check snapkernel tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install lint
	$(VENV)/bin/pytest -q -rs $(PYTEST_ARGS)

# Newest versions pyproject.toml allows, pinned into constraints.txt, then every test against them.
lock: check-python
	scripts/lock.sh
	$(MAKE) test

proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .venv-lock snapkernel/labextension labextension/node_modules labextension/lib

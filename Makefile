# `make run` and `make test` each do their own set-up on a fresh machine: a .venv with the CPU torch wheel.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= pipelines/configs/digits.yaml

.PHONY: setup run test lint docs format clean ui-check

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fdm run $(CONFIG)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The docs site into site/; --strict (also in mkdocs.yml) fails on a broken link, anchor or missing page.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: lint docs
	$(VENV)/bin/pytest

# The MLflow UI in headless Chromium (not part of `make test`): npm's @sparticuz/chromium ships the browser
# binary in its package (no vendor download), puppeteer-core drives it; both go into tests/ui/node_modules.
UI_NODE := tests/ui/node_modules/.package-lock.json

$(UI_NODE): tests/ui/package.json tests/ui/package-lock.json
	cd tests/ui && npm ci --no-audit --no-fund --loglevel=error

ui-check: $(STAMP) $(UI_NODE)
	$(PY) tests/ui/ui_check.py --out .ui-check

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site tests/ui/node_modules .ui-check

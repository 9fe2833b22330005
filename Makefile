# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: setup demo renew test test-django42 lint bench worker clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	cd example_project && ../$(BIN)/python manage.py migrate --noinput -v 0
	cd example_project && DEMO_PORT=$(PORT) ../$(BIN)/python manage.py runserver 127.0.0.1:$(PORT)

# The demo's nightly job, sent to the demo running on $(PORT).
renew: setup
	cd example_project && DEMO_PORT=$(PORT) ../$(BIN)/python manage.py renew_subscriptions

test: setup
	$(BIN)/python -m pytest

# The same suite on the oldest supported Django, in a venv of its own.
OLDEST := .venv-django42
$(OLDEST)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q -e ".[test]" "django>=4.2,<4.3"
	touch $@

test-django42: $(OLDEST)/bin/.installed
	$(OLDEST)/bin/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

$(BIN)/.bench-installed: pyproject.toml $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $@

bench: setup $(BIN)/.bench-installed
	$(BIN)/python benchmarks/delivery.py
	$(BIN)/python benchmarks/clients.py
	$(BIN)/python benchmarks/end_to_end.py
	$(BIN)/python benchmarks/request.py
	$(BIN)/python benchmarks/request.py --peers
	$(BIN)/python benchmarks/soak.py
	$(BIN)/python benchmarks/backfill.py
	$(BIN)/python benchmarks/outage.py

worker: setup
	cd example_project && DEMO_PORT=$(PORT) ../$(BIN)/celery -A demo worker -l info

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info example_project/db.sqlite3*

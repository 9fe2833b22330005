# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: setup demo demo-tasks renew test test-matrix $(addprefix test-,$(CELLS)) lint bench worker clean
.PHONY: docs dist test-wheel test-sdist

# The suite's needs (the public `test` extra) and the project's own tools (the `dev` group,
# PEP 735: pip >= 25.1, hence the upgrade first).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]" --group dev
	touch $@

setup: $(BIN)/.installed

# --- The demo: a venv of its own with only what it needs (the `demo` group), on the newest
# Python here that runs (the newest Django with it: 6.x needs 3.12+). For a start in seconds:
# no pip in the venv (the interpreter's own pip fills it, `pip --python`), no bytecode ahead
# of time (Python compiles what the demo imports), and no build of this package (the demo
# imports it from the checkout, through PYTHONPATH). --------------------------------------
DEMO_PYTHON ?= $(shell for p in python3.14 python3.13 $$(ls -d $$HOME/.pyenv/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -rV) python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3 2>/dev/null) $(PYTHON); do $$p -c '' 2>/dev/null && { echo $$p; break; }; done)
DEMO_VENV ?= .venv-demo
DEMO_BIN := $(DEMO_VENV)/bin
DEMO_RUN := cd example_project && DEMO_PORT=$(PORT) PYTHONPATH=$(CURDIR) ../$(DEMO_BIN)/python manage.py

$(DEMO_BIN)/.installed: pyproject.toml
	$(DEMO_PYTHON) -m venv --without-pip $(DEMO_VENV)
	$(DEMO_PYTHON) -m pip --python $(DEMO_BIN)/python install -q --no-compile $$($(DEMO_PYTHON) -c \
	  "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['dependency-groups']['demo'])")
	touch $@

demo: $(DEMO_BIN)/.installed
	$(DEMO_RUN) migrate --noinput -v 0
	$(DEMO_RUN) runserver 127.0.0.1:$(PORT)

# The demo on Django Tasks: its own database is the queue, and db_worker runs beside it.
demo-tasks: setup
	cd example_project && DEMO_BACKEND=tasks ../$(BIN)/python manage.py migrate --noinput -v 0
	cd example_project && export DEMO_BACKEND=tasks DEMO_PORT=$(PORT) && \
	{ ../$(BIN)/python manage.py db_worker & trap 'kill $$!' EXIT; \
	../$(BIN)/python manage.py runserver 127.0.0.1:$(PORT); }

# The demo's nightly job, sent to the demo running on $(PORT).
renew: $(DEMO_BIN)/.installed
	$(DEMO_RUN) renew_subscriptions

test: setup
	$(BIN)/python -m pytest

# The test matrix: the same suite on each supported Django, one venv per cell. `make test`
# above is the Django 5.2 cell (the default python3, 3.11). A cell's Python is python3.X on
# PATH when that runs, else pyenv's build of it.
find-python = $(shell for p in python$(1) /root/.pyenv/versions/$(1).*/bin/python3; do \
	"$$p" -V >/dev/null 2>&1 && { command -v "$$p"; exit 0; }; done; echo python$(1))

# Python 3.12.0-3.12.2 start no thread in an exit hook (CPython gh-113964), so the test that
# pins a thread pool's behaviour at exit is left out of the 3.12 cell; the package's own flush
# at exit runs its event loop in the exiting thread there, and its test runs in every cell.
PY312 := tests/test_private_apis.py::test_register_atexit_runs_while_thread_pools_still_take_work

#     cell      venv            Python  Django          pytest arguments
CELLS := django61 django60 django42
django61 := .venv313        3.13    "django>=6.1,<6.2"
django60 := .venv-django60  3.12    "django>=6.0,<6.1"  -m "not browser" $(addprefix --deselect=,$(PY312))
django42 := .venv-django42  3.10    "django>=4.2,<4.3"

define cell
$(word 1,$($(1)))/bin/.installed: pyproject.toml
	$$(call find-python,$(word 2,$($(1)))) -m venv $(word 1,$($(1)))
	$(word 1,$($(1)))/bin/python -m pip install -q --upgrade pip
	$(word 1,$($(1)))/bin/python -m pip install -q -e ".[test]" $(word 3,$($(1)))
	touch $$@

test-$(1): $(word 1,$($(1)))/bin/.installed
	$(word 1,$($(1)))/bin/python -m pytest $(wordlist 4,99,$($(1)))
endef
$(foreach c,$(CELLS),$(eval $(call cell,$(c))))

# Every cell, as CI runs them.
test-matrix: test $(addprefix test-,$(CELLS))

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
	$(BIN)/python benchmarks/request.py --tasks
	$(BIN)/python benchmarks/tasks_worker.py
	$(BIN)/python benchmarks/soak.py
	$(BIN)/python benchmarks/backfill.py
	$(BIN)/python benchmarks/outage.py

worker: setup
	cd example_project && DEMO_PORT=$(PORT) ../$(BIN)/celery -A demo worker -l info

# --- Release: the docs, both distributions, and the suite against what users install -------
RELEASE := .venv-release
$(RELEASE)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(RELEASE)
	$(RELEASE)/bin/python -m pip install -q --upgrade pip
	$(RELEASE)/bin/python -m pip install -q --group release
	touch $@

docs: setup
	$(BIN)/sphinx-build -W --keep-going -q -b html docs build/docs

dist: $(RELEASE)/bin/.installed
	rm -rf dist
	$(RELEASE)/bin/python -m build --outdir dist .
	$(RELEASE)/bin/twine check --strict dist/*

# After `make dist`: the wheel installed (not editable) in a clean venv, the sdist unpacked
# and installed as a packager would; see .ci/test-dist. Each is also a cell of the matrix:
# the wheel on the django61 cell's Python and Django, the sdist on django42's, so that CI
# runs the suite on those two against what users install rather than twice over.
dist-cell = PYTHON=$(call find-python,$(word 2,$($(1)))) DJANGO=$(word 3,$($(1)))
test-wheel:
	$(call dist-cell,django61) bash .ci/test-dist wheel
test-sdist:
	$(call dist-cell,django42) bash .ci/test-dist sdist

clean:
	rm -rf $(VENV) $(foreach c,$(CELLS),$(word 1,$($(c)))) $(DEMO_VENV) $(RELEASE) build dist *.egg-info example_project/db.sqlite3*

# Each target sets up its own virtualenv on first use: a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test faults slow bench scale lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## a whole campaign on SQLite, an embedded broker and an in-process SMTP server
	$(VENV)/bin/mailer demo $(ARGS)

test: $(STAMP)  ## unit and integration tests (real Redis/PostgreSQL when reachable)
	$(PY) -m pytest -m "not faults and not slow"

faults: $(STAMP)  ## the fault suite: kills real processes, restarts Redis, cuts the database
	$(PY) -m pytest -m faults -s

slow: $(STAMP)  ## long measurements: a million-row campaign's enqueue time and memory
	$(PY) -m pytest -m slow -s

bench: $(STAMP)  ## side-by-side throughput benchmark; writes bench/results/latest.json
	$(PY) bench/run.py

scale: $(STAMP)  ## mailer on 10M deliveries of history vs an empty outbox (not in CI); ARGS="--help"
	$(PY) bench/scale.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

# queue-manager: `make run` serves the dashboard, `make test` runs every test,
# `make test-fast` those that start no process.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: run test test-fast bench bench-history migrate worker clean

# The virtualenv is rebuilt when a requirements file changes.
$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

migrate: $(BIN)/.installed
	$(BIN)/flask --app wsgi db upgrade

# Embedded mode unless REDIS_URL is set: one process, Huey on SQLite.
run: migrate
	PORT=$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# A consumer for the distributed mode (REDIS_URL set); QUEUE picks the queue.
worker: migrate
	$(BIN)/huey_consumer huey_tasks.huey --workers 4 --worker-type thread

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The tests that start no process (no Redis, gunicorn, consumer or browser).
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not processes" $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/throughput.py $(BENCH_ARGS)
	$(BIN)/python bench/submit.py
	$(BIN)/python bench/live.py
	$(BIN)/python bench/reconcile.py

# Every read and the live pages' CPU at 1,000 and 1,000,000 jobs (bench/history.py):
# minutes the first time (it seeds the large ledger, then keeps it), so not in bench.
bench-history: $(BIN)/.installed
	$(BIN)/python bench/history.py $(HISTORY_ARGS)

clean:
	rm -rf $(VENV) instance .pytest_cache .hypothesis

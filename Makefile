# casty-sa: every target does its own set-up on a fresh machine.
#   make test   - the whole suite (SQLite files, and a real PostgreSQL and MariaDB started by
#                 the suite; Debian's mariadb-server is installed first where missing)
#   make demo   - the bank-account example, run twice to show recovery, then the bank's
#                 balances read model (a projection), run twice
#   make lint   - ruff + mypy --strict
#   make bench  - the side-by-side benchmark

# the first interpreter >= 3.12 that actually runs (pyenv shims exist even when they cannot run)
PYTHON ?= $(shell for p in python3.12 python3.13 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers of `make test`: most tests wait on servers and subprocesses, not on a
# core, so four share two cores well; each worker starts its own PostgreSQL and MariaDB
TEST_WORKERS ?= 4

.PHONY: venv test demo lint bench docs clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "casty-sa needs Python >= 3.12 (casty 0.21); none found" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	tools/install-mariadb.sh
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

demo: $(STAMP)
	rm -f examples/bank.db examples/bank.db-wal examples/bank.db-shm
	$(BIN)/python examples/bank_account.py --url sqlite:///examples/bank.db
	$(BIN)/python examples/bank_account.py --url sqlite:///examples/bank.db
	rm -f examples/bank_balances.db examples/bank_balances.db-wal examples/bank_balances.db-shm
	$(BIN)/python examples/bank_balances.py --url sqlite:///examples/bank_balances.db
	$(BIN)/python examples/bank_balances.py --url sqlite:///examples/bank_balances.db

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy tests/app_fixture/*.py tests/app_fixture/versions/*.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build

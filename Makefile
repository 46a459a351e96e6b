# Every target installs into .venv first if pyproject.toml is newer than the install.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-cluster lint typecheck bench install clean

# Not through a link to another checkout's venv (as git worktrees share one): a fresh
# worktree's pyproject.toml is newer than the stamp, and installing from it pointed the shared
# editable install, so every process started from the other checkout, at this worktree.
$(STAMP): pyproject.toml
	@if [ -L $(VENV) ]; then \
	  echo "$(VENV) links to a shared venv: not reinstalled from this checkout"; \
	else \
	  set -e; \
	  test -x $(PY) || python3 -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q -e '.[dev]'; \
	  touch $(STAMP); \
	fi

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mediamarket serve

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not cluster"

# The production topology under kills (tests/test_cluster.py): alone, since it runs five
# processes on one PostgreSQL and measures their connections and takeover times.
test-cluster: $(STAMP)
	$(PY) -m pytest -q -m cluster -rsx tests/test_cluster.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench.run --update-readme README.md

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache

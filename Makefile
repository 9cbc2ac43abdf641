# The README's two commands: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SPEED ?= 20

.PHONY: demo test quick typecheck bench samples clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 12) else f"convoflow needs Python 3.10-3.12 (Bytewax 0.21.1 has no wheels for {v[0]}.{v[1]}); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py run --input samples/conversations.jsonl --rules samples/rules.jsonl --lake --speed-factor $(SPEED) --out-dir out/demo --overwrite

# pytest's last line gives the test counts; the line after it the whole target's wall time.
test: $(STAMP)
	@started=$$(date +%s); $(PY) -m mypy && $(PY) -m pytest; status=$$?; \
	echo "make test: exit $$status after $$(( $$(date +%s) - started )) s (type check and every test)"; exit $$status

typecheck: $(STAMP)
	$(PY) -m mypy

quick: $(STAMP)
	$(PY) -m pytest -m "not slow and not kafka and not lake and not crash"

bench: $(STAMP)
	$(PY) benchmarks/bench_replay.py

samples: $(STAMP)
	$(PY) cli.py samples --out samples/conversations.jsonl

clean:
	rm -rf $(VENV) out .pytest_cache

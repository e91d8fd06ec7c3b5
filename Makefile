# The two commands of the README: `make demo` and `make test`. Each sets up what it needs first.
PY := .venv/bin/python
CONFIG ?= configs/demo.yaml
CYCLES ?= 3
# The demo tenants' plaintext keys for the simulated users (configs hold only their sha256).
export LOOP_DEMO_API_KEY ?= sk-loop-demo-acme
export LOOP_DEMO_GLOBEX_KEY ?= sk-loop-demo-globex

.PHONY: venv setup demo serve test clean

venv:            ## the pinned stack in .venv (idempotent; seconds when up to date)
	@bash scripts/setup.sh

setup: venv      ## + the student (the cycle-0 student of the demo's world) and its draft under .loop/models
	@$(PY) -m loop.cli models fetch --config $(CONFIG)

demo: setup      ## the continual-learning demo: 3 cycles (CYCLES=N) on the embedded default, then its report
	$(PY) jobs/run_loop.py --config $(CONFIG) --cycles $(CYCLES)

serve: setup     ## serve the registry's champions until Ctrl-C
	$(PY) -m loop.cli serve $(CONFIG)

test: venv       ## the test suite (tiny models built from config; no downloads)
	$(PY) -m pytest tests -x -q --timeout 1500 --durations=25

clean:
	rm -rf .loop .loop-tiny

# The two commands of the README: `make demo` and `make test`. Each sets up what it needs first.
PY := .venv/bin/python
CONFIG ?= configs/demo.yaml
CYCLES ?= 1
export LOOP_DEMO_API_KEY ?= sk-loop-demo-acme
export LOOP_ADMIN_KEY ?= sk-loop-demo-admin

.PHONY: setup models demo test clean

setup:
	@bash scripts/setup.sh

models: setup
	@$(PY) -m loop.cli models fetch --config $(CONFIG)

demo: models
	$(PY) jobs/run_loop.py --config $(CONFIG) --cycles $(CYCLES)

test: setup
	$(PY) -m pytest tests -x -q --timeout 1500

clean:
	rm -rf .loop

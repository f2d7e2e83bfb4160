# fleetd developer entry points. Every target sets up .venv itself (scripts/bootstrap.sh).
.PHONY: demo test check lint types imports fmt setup plan bench bench-gateway bench-failover

setup:
	@./scripts/bootstrap.sh

# Quick start #1: fleetd's main job, the example fleet on a simulated 2-GPU host (no GPU
# needed): the plan, then the daemon supervising emulated engines until Ctrl-C.
demo: setup
	.venv/bin/fleetd plan etc/fleetd.toml --simulate
	.venv/bin/fleetd demo $(DEMO_ARGS)

plan: setup
	.venv/bin/fleetd plan etc/fleetd.toml --simulate

# Quick start #2: everything CI checks (lint, types, import layers, tests).
test: setup
	./scripts/test.sh

check: test

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

types: setup
	.venv/bin/mypy

imports: setup
	.venv/bin/lint-imports

fmt: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: setup
	.venv/bin/python bench/restart.py

# fleetd's gateway vs direct vs nginx vs LiteLLM (installs nginx, wrk and LiteLLM first)
bench-gateway: setup
	./scripts/bench_deps.sh
	.venv/bin/python bench/gateway.py

bench-failover: setup
	.venv/bin/python bench/failover.py

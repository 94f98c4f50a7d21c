# Local development: `make up` brings up the stack and runs the demo, `make test` runs the
# suite (tests start the Redis/PostgreSQL they need), `make down` stops everything.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PY := .venv/bin/python
# devstack is stdlib-only, so stopping and inspecting work even before `make deps`.
DEVSTACK = $(if $(wildcard $(PY)),$(PY),python3) -m devstack
PYTEST_ARGS ?=

.PHONY: help deps up down status test lint bench clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

deps: ## install Redis and PostgreSQL (apt) and the virtualenv, if missing or outdated
	@bash scripts/bootstrap.sh

up: deps ## start Redis, Redis Cluster, PostgreSQL and run the demo against them
	@$(PY) -m devstack start
	$(PY) -m services.core.demo
	@echo
	@echo "running:"
	@$(PY) -m devstack status
	@echo "logs and data: .zvt/"
	@echo "stop it with: make down"

down: ## stop everything devstack started
	@$(DEVSTACK) stop

status: ## what runs where
	@$(DEVSTACK) status

test: deps ## type-check, then run the test suite
	$(PY) -m mypy
	$(PY) -m pytest -p no:cacheprovider -q $(PYTEST_ARGS)

lint: deps ## type-check
	$(PY) -m mypy
	$(PY) -m mypy --strict devstack

bench: deps ## bus benchmark, 10 s, results in .zvt/bench/bus.json
	@mkdir -p .zvt/bench
	$(PY) loadtest/bench_bus.py --seconds 10 --json .zvt/bench/bus.json

clean: ## stop everything and remove .zvt (all local data and logs)
	@if [ -d .zvt ]; then $(DEVSTACK) stop; fi
	rm -rf .zvt

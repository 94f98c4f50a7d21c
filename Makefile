# Local development: `make up` brings up the stack and runs the demo, `make test` runs the
# suite (tests start the Redis/PostgreSQL they need), `make down` stops everything.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PY := .venv/bin/python
# devstack is stdlib-only, so stopping and inspecting work even before `make deps`.
DEVSTACK = $(if $(wildcard $(PY)),$(PY),python3) -m devstack
PYTEST_ARGS ?=

# `make up` settings (e.g. `make up REDIS=single ORDERS=1000`):
REDIS ?= cluster#          the fleet's Redis: cluster (127.0.0.1:7101, ZVT_REDIS_CLUSTER=true) or single (127.0.0.1:6390)
NAMESPACE ?= zvt#          ZVT_BUS_NAMESPACE of the fleet
GATEWAY_PORT ?= 8080#      the public API on 127.0.0.1
WEBHOOK_PORT ?= 8081#      the local webhook receiver the notifications service posts to
ORDERS ?= 200#             what the main job places ...
PORTFOLIOS ?= 5#           ... across this many portfolios (plus a halted one) ...
CONCURRENCY ?= 16#         ... this many at a time
FLEET_STATE ?= .zvt#       the fleet's env files (fleet.env, local.env), pid files and logs
PROFILE ?= paper#          paper (routing on the in-process paper venue) or staging (three simulated venue servers on 9101-9103, traded through ccxt)
FLEET = fleet --state-dir $(FLEET_STATE)

.PHONY: help deps up down status test lint bench clean chart

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

deps: ## install Redis and PostgreSQL (apt) and the virtualenv, if missing or outdated
	@bash scripts/bootstrap.sh

up: deps ## start Redis, Redis Cluster, PostgreSQL and every service, then place orders through the API
	@$(PY) -m devstack start
	@echo
	@$(PY) -m devstack $(FLEET) start --redis $(REDIS) --namespace $(NAMESPACE) \
		--gateway-port $(GATEWAY_PORT) --webhook-port $(WEBHOOK_PORT) --profile $(PROFILE)
	@echo
	env -u ZVT_GATEWAY_URL -u ZVT_API_KEY -u ZVT_WEBHOOK_SINK_URL $(PY) -m services.demo \
		--env-file $(FLEET_STATE)/local.env --orders $(ORDERS) --portfolios $(PORTFOLIOS) --concurrency $(CONCURRENCY)
	@echo
	@echo "the stack keeps running: make status, make down; logs in $(FLEET_STATE)/logs/;"
	@echo "to use it from a shell: set -a; . $(FLEET_STATE)/local.env; set +a"

down: ## stop the services, then Redis, Redis Cluster and PostgreSQL
	@$(DEVSTACK) $(FLEET) stop
	@$(DEVSTACK) stop

status: ## what runs where
	@$(DEVSTACK) status
	@$(DEVSTACK) $(FLEET) status

test: deps ## type-check, then run the test suite
	$(PY) -m mypy
	@# the control plane and helm of tests/k8s, built once into ~/.cache/zvt-fleet (about 15 min cold)
	@bash scripts/build-k8s.sh >/dev/null
	@bash scripts/build-helm.sh >/dev/null
	$(PY) -m pytest -p no:cacheprovider -q --durations=25 $(PYTEST_ARGS)

chart: ## lint and render charts/zvt-fleet with the real helm CLI (built once into .cache/tools)
	@HELM=$$(bash scripts/build-helm.sh) && for v in "" charts/zvt-fleet/ci/*.yaml k8s/values-*.yaml; do \
		echo "chart: $${v:-default values}"; \
		$$HELM lint --strict charts/zvt-fleet $${v:+-f $$v} >/dev/null; \
		$$HELM template zvt charts/zvt-fleet -n trading --kube-version 1.36.0 $${v:+-f $$v} >/dev/null; \
	done

lint: deps ## type-check
	$(PY) -m mypy
	$(PY) -m mypy --strict devstack

bench: deps ## bus benchmark, 10 s, results in .zvt/bench/bus.json
	@mkdir -p .zvt/bench
	$(PY) loadtest/bench_bus.py --seconds 10 --json .zvt/bench/bus.json

clean: ## stop everything and remove .zvt (all local data and logs)
	@if [ -d .zvt ]; then $(DEVSTACK) fleet stop; $(DEVSTACK) stop; fi
	rm -rf .zvt

# The few verbs a newcomer needs. Each works on a fresh clone: the environment is built on demand.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo demo-moe swarm test test-fast test-compose compose-env images docker-engine lint format bench bench-vs-torchft clean system-packages

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/potluck demo

# A tiny mixture of experts: two expert servers and a client that trains through them (about 2 minutes).
demo-moe: $(STAMP)
	$(VENV)/bin/potluck demo --moe

# The docker-compose topology as local processes: coordinator, demo run, 2 peers (Ctrl-C stops all).
swarm: $(STAMP)
	$(VENV)/bin/potluck swarm up --peers 2

# Debian packages the tests drive for real (the dashboard's browser test; Prometheus and promtool in
# tests/test_operations.py; ip, iptables, ethtool and ping for the network-namespace test bed in
# tests/netbed). Installed once, when missing and when we may (CI runs as root); without them those
# tests skip with a reason.
SYSTEM_PACKAGES := chromium fonts-liberation prometheus iproute2 iptables ethtool iputils-ping
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "make: tests that need$$missing will skip (install them, or run as root)"; fi; fi

# Everything but the `compose` tests (tests/conftest.py leaves them out unless -m names them), on two workers
# (pytest-xdist, a file at a time): much of the suite waits on peers' clocks, and a second worker fills that time.
TEST_WORKERS ?= 2
test: $(STAMP) system-packages
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The images docker-compose.yml runs, built without a container registry (deploy/images.sh says how):
# potluck:$(VARIANT) and potluck-prometheus:bookworm. VARIANT=cuda for NVIDIA GPUs; BASE_IMAGE=
# python:3.11-slim-bookworm to build on the official Python image where a registry is reachable.
VARIANT    ?= cpu
BASE_IMAGE ?=
images: $(STAMP) docker-engine
	PYTHON=$(PY) VARIANT=$(VARIANT) BASE_IMAGE=$(BASE_IMAGE) deploy/images.sh

# Docker's engine, docker-compose and mmdebstrap from Debian, each installed when missing and we may
# (CI runs as root), and dockerd started when no daemon answers (its log: build/dockerd.log).
docker-engine:
	@missing=""; command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "make: install$$missing (as root) for the images and the compose test"; exit 2; fi; fi
	@docker info >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" != 0 ]; then echo "make: no Docker daemon answers: start it (or run as root)"; exit 2; fi; \
	  mkdir -p build; echo "make: starting dockerd (log: build/dockerd.log)"; \
	  setsid dockerd >build/dockerd.log 2>&1 </dev/null & \
	  for i in $$(seq 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done; \
	  echo "make: dockerd did not answer within 60 s (build/dockerd.log)"; exit 2; }

# Grafana's admin password for `docker compose up` (docker-compose.yml has no default): a random one
# written once into .env, which compose reads (GRAFANA_ADMIN_PASSWORD in the environment wins), and printed.
compose-env:
	@if ! grep -qs '^GRAFANA_ADMIN_PASSWORD=.' .env; then \
	  umask 077; echo "GRAFANA_ADMIN_PASSWORD=$$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')" >> .env; fi
	@echo "make: Grafana's admin password (user admin) is in .env: $$(sed -n 's/^GRAFANA_ADMIN_PASSWORD=//p' .env)"

# The compose swarm for real, on the images just built (tests/test_compose.py; minutes; CI runs it after
# `make test`, which leaves it out).
test-compose: images
	$(PY) -m pytest -m compose tests/test_compose.py $(PYTEST_ARGS)

# The unit tier: no process, no DHT, no daemon (tests/conftest.py enforces it); under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -m "unit and not integration" -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/codespell runtime peer protocols coordinator hivemind_ext tools tests bench docs README.md CHANGELOG.md

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/convergence.py

# Potluck's DiLoCo side by side with torchft's (bench/vs_torchft.py; root, for the network namespaces; about
# 15 minutes on 2 cores). Installs the vs-torchft extra of pyproject.toml first: torchft without its
# dependencies (pip must not replace torch), then the OpenTelemetry packages it imports.
VS_TORCHFT_ARGS ?= --runs 3 --replicas 2,4
VS_TORCHFT_EXTRA = $(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["vs-torchft"]))'
bench-vs-torchft: $(STAMP) system-packages
	$(PY) -m pip install --quiet --no-deps $$($(VS_TORCHFT_EXTRA) | grep '^torchft')
	$(PY) -m pip install --quiet $$($(VS_TORCHFT_EXTRA) | grep -v '^torchft')
	$(PY) bench/vs_torchft.py $(VS_TORCHFT_ARGS)

clean:
	rm -rf $(VENV) .demo .demo-moe .pytest_cache .ruff_cache *.egg-info

# The few verbs a newcomer needs. Each works on a fresh clone: the environment is built on demand.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo swarm test test-fast lint format bench clean system-packages

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/potluck demo

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

test: $(STAMP) system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

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

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache *.egg-info

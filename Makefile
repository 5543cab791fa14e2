# One task runner for the project. `make demo` and `make test` are the README's two commands:
# each sets up everything it needs on a fresh machine (virtual environment, Python packages,
# Maven jars) and starts and stops the local infrastructure itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AIGC := $(VENV)/bin/aigc
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
M2 ?= $(HOME)/.m2/repository
PYTEST_ARGS ?=

.PHONY: setup tools demo run status down test test-unit lint typecheck bench chaos lock infra-up infra-down clean \
	train-demo-model eval-demo-model

setup: $(VENV)/.installed infra/lib/.resolved tools

# Debian's prometheus (with promtool) and tmux: `aigc infra up` runs Prometheus, the rule tests run promtool
# and the `aigc top` test runs tmux. Returns at once when they are installed.
tools:
	bash infra/install-tools.sh

# uv installs from its cache under ~/.cache/uv by hard links, so a warm machine sets up in seconds.
# --compile-bytecode: uv writes no .pyc files by default, and where PYTHONDONTWRITEBYTECODE is set (it is on
# our machines) no process writes them either, so every stage, test and CLI process compiled torch,
# diffusers and the rest from source each time it started: importing StableDiffusionPipeline took 28.3 s
# here without them and 11.7 s with them, torch 7.0 s and 3.8 s.
$(VENV)/.installed: requirements.lock pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip sync -q --compile-bytecode --python $(PY) requirements.lock
	$(UV) pip install -q --python $(PY) --no-deps -e .
	touch $@

# Jars for Kafka, Cassandra and S3Proxy, resolved from Maven Central into infra/lib/ (git-ignored);
# the Maven repository is cached outside the clone.
infra/lib/.resolved: infra/maven/pom.xml infra/maven/kafka/pom.xml infra/maven/cassandra/pom.xml infra/maven/s3proxy/pom.xml
	rm -rf infra/lib
	mvn -B -q -f infra/maven/pom.xml -Dmaven.repo.local=$(M2) package
	touch $@

demo: setup
	$(AIGC) demo

# The demo's shapes model: trained on the CPU from fixed seeds into gpu_consumers/shapes/model (shipped in the
# repository, so `make demo` never needs this), and its prompt agreement on 200 unseen attribute combinations.
train-demo-model: setup
	$(AIGC) models train-shapes --max-minutes 30

eval-demo-model: setup
	$(AIGC) models eval-shapes --prompts 200 --sheet docs/shapes-agreement.png

# The pipeline as a background service for your own producers: `make run` starts the infrastructure and
# the stages and returns once they are ready; `make status` says what runs; `make down` stops it all.
run: setup
	$(AIGC) up

status: setup
	$(AIGC) status

down: setup
	$(AIGC) down

# Lint and type checks first (seconds): a docstring, complexity, import-layer or typing slip fails the suite.
test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The PEER scenario runs Celery on Debian's redis-server (installed here when missing; root on our machines).
bench: setup
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(AIGC) bench

chaos: setup
	$(AIGC) chaos --full --brokers 3

lock:
	$(UV) pip compile --python-version 3.11 --quiet requirements.in -o requirements.lock --custom-compile-command "make lock"

infra-up: setup
	$(AIGC) infra up

infra-down: setup
	$(AIGC) infra down

clean:
	rm -rf $(VENV) infra/lib .aigc

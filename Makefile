# tsforge: export -> archive -> serve -> predict. `make` (or `make help`) lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
BUILD   ?= build
STORE   ?= model_store
REPORTS ?= reports
MODEL   ?= digits# the model that serve and predict use
MODELS  ?= digits# the models that export and archive build
PROFILE ?= dev# configuration profile: dev (config/config.properties)
CONFIG  := $(if $(filter dev,$(PROFILE)),config/config.properties,config/$(PROFILE).properties)
RUN_DIR ?= $(BUILD)/serve
PYTEST_ARGS ?=

INSTALLED := $(VENV)/.installed
HANDLER_SOURCES := $(wildcard handlers/*.py)
EXPORT_SOURCES := $(wildcard export/*.py export/models/*.py)
ARCHIVES := $(MODELS:%=$(STORE)/%.mar)

# The git state of the served code, rewritten only when it changes, so archives record the commit
# they were built from and a rebuild happens after a commit, but not otherwise.
GIT_STATE := $(BUILD)/git-state
_state := $(shell git rev-parse HEAD 2>/dev/null || echo unknown) $(shell test -n "$$(git status --porcelain -- handlers export config pyproject.toml 2>/dev/null)" && echo dirty || echo clean)
$(shell mkdir -p $(BUILD); [ "$$(cat $(GIT_STATE) 2>/dev/null)" = "$(_state)" ] || echo "$(_state)" > $(GIT_STATE))

.PHONY: help install export archive serve stop status predict grpc test lint clean

help: ## List every target and the variables they take
	@echo "usage: make TARGET [MODEL=digits] [MODELS='digits'] [PROFILE=dev]"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort -u | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

install: $(INSTALLED) ## Create the virtual environment in .venv (idempotent)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-usable builds that pip finds locally; torchvision needs this exact pair.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,loadtest]'
	touch $@

export: $(MODELS:%=$(BUILD)/%/export.json) ## Trace MODELS to TorchScript with a parity check (build/NAME/)

$(BUILD)/%/export.json: $(EXPORT_SOURCES) | $(INSTALLED)
	$(PY) -m export $* --out-dir $(BUILD)

archive: $(ARCHIVES) ## Package MODELS into model_store/NAME.mar with a version file

$(STORE)/%.mar: $(BUILD)/%/export.json $(HANDLER_SOURCES) config/models/%.yaml $(GIT_STATE) pyproject.toml
	$(PY) -m tsforge.archive $* --build-dir $(BUILD) --store $(STORE)

serve: $(STORE)/$(MODEL).mar ## Start TorchServe with MODEL; returns once it is ready
	$(PY) -m tsforge.server start --config $(CONFIG) --run-dir $(RUN_DIR) --model-store $(STORE) --models $(MODEL)

stop: ## Stop the TorchServe that `make serve` started
	@if [ -x $(PY) ]; then $(PY) -m tsforge.server stop --run-dir $(RUN_DIR); else echo "nothing to stop"; fi

status: | $(INSTALLED) ## Say whether TorchServe runs
	@$(PY) -m tsforge.server status --run-dir $(RUN_DIR)

predict: | $(INSTALLED) ## Send MODEL's example inputs to the running server and print the answers
	$(PY) -m tsforge.predict $(MODEL) --config $(CONFIG)

grpc: | $(INSTALLED) ## Generate gRPC stubs from the protos inside TorchServe's frontend jar (build/grpc)
	$(PY) -m tsforge.grpc_stubs

test: $(ARCHIVES) ## Run the test suite (builds what it needs first)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: | $(INSTALLED) ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy handlers export tsforge loadtest

clean: stop ## Remove built files (exports, archives, reports); keeps .venv
	rm -rf $(BUILD) $(REPORTS) $(STORE)/*.mar

# ---- handlers (image, text, tensor examples) ----

# ---- load tests, benchmarks, tuner ----

# ---- operations: versions, rollout, gRPC, Open Inference Protocol, metrics ----

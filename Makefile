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
MODELS  ?= $(MODEL)# the models that export and archive build: by default what serve serves
# The exports beside fp32 TorchScript (export/wanted.py): quick (every declared variant but AOTInductor, whose C++
# compile takes 30-46 s a model), all, none, or names (int8,onnx,onnx-int8,aotinductor). The suite's targets build
# all: its tests serve every variant.
SUITE_GOALS := test test-fast test-isa package reliability-data
VARIANTS ?= $(if $(filter $(SUITE_GOALS),$(MAKECMDGOALS)),all,quick)
PROFILE ?= dev# configuration profile: dev (config/config.properties)
CONFIG  := $(if $(filter dev,$(PROFILE)),config/config.properties,config/$(PROFILE).properties)
RUN_DIR ?= $(BUILD)/serve
PYTEST_ARGS ?=

INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.installed-dev
HANDLER_SOURCES := $(wildcard handlers/*.py)
EXPORT_SOURCES := $(wildcard export/*.py export/models/*.py tsforge/packaging/new.py models/*.py $(addsuffix /*.py,$(subst :, ,$(TSFORGE_MODELS)))) handlers/runtimes.py
ARCHIVES := $(MODELS:%=$(STORE)/%.mar)

# The git state of the served code, rewritten only when it changes, so archives record the commit
# they were built from and a rebuild happens after a commit, but not otherwise.
GIT_STATE := $(BUILD)/git-state
_state := $(shell git rev-parse HEAD 2>/dev/null || echo unknown) $(shell test -n "$$(git status --porcelain -- handlers export config pyproject.toml 2>/dev/null)" && echo dirty || echo clean)
$(shell mkdir -p $(BUILD); [ "$$(cat $(GIT_STATE) 2>/dev/null)" = "$(_state)" ] || echo "$(_state)" > $(GIT_STATE))

# build/NAME/variants records the variants NAME's export holds; it is rewritten (and the export redone, with the
# union) only when VARIANTS asks for more, so `make serve` after `make test` rebuilds nothing.
$(shell $(PYTHON) -m tsforge.packaging.wanted --build $(BUILD) --variants '$(VARIANTS)' $(sort $(MODELS) $(MODEL)))

.PHONY: help install install-dev export archive serve stop status predict grpc test lint clean

help: ## List every target and the variables they take
	@echo "usage: make TARGET [MODEL=digits] [MODELS='digits resnet18'] [VARIANTS=quick|all|none|int8,onnx] [PROFILE=dev]"
	@echo "  MODELS (default: MODEL) are exported and archived; VARIANTS picks the exports beside fp32 TorchScript:"
	@echo "  quick (default: int8, ONNX, ONNX int8), all (+ AOTInductor, 30-46 s a model), none, or names"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort -u | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

install: $(INSTALLED) ## Create .venv with what archive and serve need: torch, the core, examples, onnx, front (idempotent)

install-dev: $(DEV_INSTALLED) ## Add every other extra to .venv: the test tools, load tests, plots (test, lint, bench run it)

# `pip install` done by uv where it can be, from the same places pip's own configuration names; pip otherwise
# (tsforge/bootstrap.py says how and why)
VIA_UV = $(PY) tsforge/bootstrap.py

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torchvision 0.29.1 needs exactly torch 2.14.1 (it runs on CPU and GPU alike).
	$(VIA_UV) pip install -q torch==2.14.1 torchvision==0.29.1
	# What a first `make archive && make serve` needs: the examples (scikit-learn, MiniLM), their ONNX variants and
	# the v2 front; `pip install .` alone serves your own model (pyproject.toml lists what each extra is for).
	$(VIA_UV) pip install -q -e '.[examples,onnx,front]'
	touch $@

# The rest (test tools, kubernetes-validate's schemas, locust, matplotlib): about 200 s more of downloads on a
# fresh machine (25 s of CPU), so only the targets that use them install them.
$(DEV_INSTALLED): $(INSTALLED)
	$(VIA_UV) pip install -q -e '.[dev,loadtest,plots,examples,front,onnx]'
	touch $@

export: $(MODELS:%=$(BUILD)/%/export.json) ## Trace MODELS to TorchScript with a parity check (build/NAME/)

$(BUILD)/%/export.json: $(EXPORT_SOURCES) $(BUILD)/%/variants | $(INSTALLED)
	$(PY) -m tsforge export $* --out-dir $(BUILD) --variants "$$(cat $(BUILD)/$*/variants)"

$(BUILD)/%/variants:
	$(PYTHON) -m tsforge.packaging.wanted --build $(BUILD) --variants '$(VARIANTS)' $*

archive: $(ARCHIVES) ## Package MODELS into model_store/NAME.mar with a version file

$(STORE)/%.mar: $(BUILD)/%/export.json $(HANDLER_SOURCES) config/models/%.yaml $(GIT_STATE) pyproject.toml
	$(PY) -m tsforge archive $* --build-dir $(BUILD) --store $(STORE)

serve: $(STORE)/$(MODEL).mar ## Start TorchServe with MODEL; returns once it is ready
	$(PY) -m tsforge serve --config $(CONFIG) --run-dir $(RUN_DIR) --model-store $(STORE) --models $(MODEL)

stop: ## Stop the TorchServe that `make serve` started
	@if [ -x $(PY) ]; then $(PY) -m tsforge stop --run-dir $(RUN_DIR); else echo "nothing to stop"; fi

status: | $(INSTALLED) ## Say whether TorchServe runs
	@$(PY) -m tsforge status --run-dir $(RUN_DIR)

predict: | $(INSTALLED) ## Send MODEL's example inputs to the running server and print the answers
	$(PY) -m tsforge predict $(MODEL) --config $(CONFIG)

grpc: | $(INSTALLED) ## Generate gRPC stubs from the protos inside TorchServe's frontend jar (build/grpc)
	$(PY) -m tsforge grpc-stubs

# Two tiers (pyproject.toml's markers; tests/tiers.py fails an unmarked test that starts a server):
#   fast   no server, no Java, no whole-model export: minutes, for every change (test-fast)
#   full   the fast tier, then every test that serves (integration) or exports a whole model (slow) (test)
FAST_TIER := not integration and not slow
# what the fast tier reads: the default model and the image classifier whose archive the decode tests unpack
FAST_ARCHIVES := $(STORE)/digits.mar $(STORE)/resnet18.mar
# every archive the suite serves, built before pytest starts: its test processes then only read the store
SUITE_ARCHIVES := $(FAST_ARCHIVES) $(foreach m,digits_image digits_tensor minilm sentiment segmenter detector,$(STORE)/$(m).mar)
# the second tier runs its test files in TEST_WORKERS processes (pytest-xdist, a file's tests in one process):
# most of its time is spent waiting on servers' start and answers, so two processes keep both cores busy; the tests
# that bound a latency (`alone`) run after them, by themselves
TEST_WORKERS ?= 2

.PHONY: test-fast
test-fast: $(FAST_ARCHIVES) | $(DEV_INSTALLED) ## The fast tier: no server, no Java, no whole-model export (minutes)
	$(PY) -m pytest -m "$(FAST_TIER)" $(PYTEST_ARGS)

test: $(ARCHIVES) $(SUITE_ARCHIVES) | $(DEV_INSTALLED) ## The whole suite: the fast tier first, then what serves or exports (builds what it needs)
	$(PY) -m pytest -m "$(FAST_TIER)" $(PYTEST_ARGS)
	$(PY) -m pytest -m "not ($(FAST_TIER)) and not alone" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	$(PY) -m pytest -m "alone" $(PYTEST_ARGS)

# The suite as an older CPU runs it, on whatever CPU this is: PyTorch's kernels capped by ATEN_CPU_CAPABILITY,
# oneDNN's by ONEDNN_MAX_CPU_ISA; ONNX Runtime has no such switch, so its int8 path runs under an emulated AVX2 CPU
# without AVX-512/VNNI (tests/test_emulated_cpu.py, QEMU user mode: Debian's qemu-user), required here, not skipped.
# The first run is the whole suite; the second and third, with ATen at its scalar `default`,
# keep to the fast tier (test_autoselect, test_emulated_cpu among them) and the served-variant tests (ISA_TESTS),
# where the instruction set decides something, to bound the time.
ISA_TESTS ?= tests/test_variants.py tests/test_image_serving.py tests/test_accuracy_gate.py

.PHONY: test-isa
test-isa: $(ARCHIVES) | $(DEV_INSTALLED) ## The suite under capped ISAs: all at ATen+oneDNN AVX2; the fast tier + ISA_TESTS at ATen default, oneDNN AVX2; ONNX Runtime int8 on an emulated AVX2 CPU (qemu-user)
	@command -v qemu-x86_64 >/dev/null || { echo "test-isa needs qemu-x86_64 for ONNX Runtime's int8 path (Debian: apt-get install -y qemu-user)"; exit 2; }
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -m "$(FAST_TIER)" $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -m integration $(ISA_TESTS) $(PYTEST_ARGS)

lint: | $(DEV_INSTALLED) ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy handlers export tsforge loadtest

clean: stop ## Remove built files (exports, archives, reports); keeps .venv
	rm -rf $(BUILD) $(REPORTS) $(STORE)/*.mar

# ---- handlers (image, text, tensor examples) ----

# The digits CNN served through the generic image handler (a real-label check of handlers/image_handler.py).
$(STORE)/digits_image.mar: $(BUILD)/digits/export.json $(HANDLER_SOURCES) config/models/digits_image.yaml $(GIT_STATE) pyproject.toml
	$(PY) -m tsforge archive digits --model-name digits_image --handler handlers/image_handler.py \
		--config config/models/digits_image.yaml --build-dir $(BUILD) --store $(STORE)

.PHONY: images
images: $(STORE)/resnet18.mar $(STORE)/resnet50.mar $(STORE)/digits_image.mar ## Build the image-classifier archives (resnet18, resnet50, digits_image)

.PHONY: text-tensor
text-tensor: $(STORE)/minilm.mar $(STORE)/digits_tensor.mar ## Build the text-embedding (minilm) and tensor (digits_tensor) archives

# ---- load tests, benchmarks, tuner ----
# Variables: USERS, SPAWN_RATE, DURATION (s), PROTOCOL (rest|grpc) for loadtest; LEVELS (concurrency list) and
# DURATION (s per level) for bench, whose model is resnet18 unless MODEL is given; P99_MS, BUDGET (s) for tune.
USERS      ?= 16
SPAWN_RATE ?= 16
DURATION   ?= 20
PROTOCOL   ?= rest
LEVELS     ?= 1,4,16
P99_MS     ?= 100
BUDGET     ?= 300
LOADTEST_ARGS ?=# extra options, e.g. --tool loadgen, --mislabel-every 4
BENCH_ARGS ?=# extra options, e.g. --targets tsforge,flask
TUNE_ARGS  ?=# extra options, e.g. --batch-sizes 4,8,16 --threads 1 --apply
BENCH_MODEL := $(if $(filter command line environment,$(origin MODEL)),$(MODEL),resnet18)

.PHONY: loadtest bench tune benchmarks-doc

loadtest: $(STORE)/$(MODEL).mar | $(DEV_INSTALLED) ## Headless locust run on MODEL (USERS, SPAWN_RATE, DURATION, PROTOCOL) -> reports/loadtest/
	$(PY) -m tsforge loadtest --model $(MODEL) --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
		--protocol $(PROTOCOL) --out $(REPORTS)/loadtest/$(MODEL)-$(PROTOCOL) $(LOADTEST_ARGS)

# DATA: where the committed summaries go (docs/data); BENCH_NAME names a run other than the shipped archive's
# (BENCH_NAME=resnet18-matrix): the sizing and docs/scaling.md read only bench-MODEL.json.
DATA       ?= docs/data
BENCH_NAME ?= $(BENCH_MODEL)

bench: $(STORE)/$(BENCH_MODEL).mar | $(DEV_INSTALLED) ## tsforge vs stock handler at its best setting vs Flask vs in-process ceiling (LEVELS, DURATION) -> reports/bench/, docs/data/
	$(PY) -m loadtest.bench --model $(BENCH_MODEL) --levels $(LEVELS) --duration $(DURATION) \
		--out $(REPORTS)/bench/$(BENCH_NAME) --data $(DATA)/bench-$(BENCH_NAME).json $(BENCH_ARGS)

tune: $(STORE)/$(MODEL).mar | $(DEV_INSTALLED) ## Sweep workers x batch x delay x threads under P99_MS within BUDGET s -> reports/tune/
	$(PY) -m tsforge tune --model $(MODEL) --p99-ms $(P99_MS) --budget $(BUDGET) --out $(REPORTS)/tune/$(MODEL) \
		--data $(DATA)/tune-$(MODEL).json $(TUNE_ARGS)

BENCH_STATUS ?=# a note shown atop docs/benchmarks.md: where and how its numbers were taken

benchmarks-doc: | $(DEV_INSTALLED) ## Render docs/benchmarks.md and the generated blocks of docs/scaling.md and docs/reliability.md from docs/data/ (BENCH_STATUS=note)
	$(PY) -m loadtest.render --data $(DATA) --status "$(BENCH_STATUS)"

# ---- operations: versions, rollout, gRPC, Open Inference Protocol, metrics ----
# A second version of MODEL: `make archive MODEL=digits VERSION=2.0` -> model_store/digits-2.0.mar (the model
# inside is still named digits, so it registers as version 2.0 of digits).
VERSION ?=
TO ?=
ifneq ($(strip $(VERSION)),)
VERSIONED_ARCHIVE := $(STORE)/$(MODEL)-$(strip $(VERSION)).mar
archive: $(VERSIONED_ARCHIVE)
$(VERSIONED_ARCHIVE): $(BUILD)/$(MODEL)/export.json $(HANDLER_SOURCES) config/models/$(MODEL).yaml $(GIT_STATE) pyproject.toml
	$(PY) -m tsforge archive $(MODEL) --version $(strip $(VERSION)) --archive-name $(MODEL)-$(strip $(VERSION)) \
		--build-dir $(BUILD) --store $(STORE)
endif

.PHONY: verify deploy rollback undeploy deploy-status predict-grpc metrics

verify: | $(INSTALLED) ## Check every archive in the store against its version file (offline)
	$(PY) -m tsforge verify --store $(STORE)

deploy: $(VERSIONED_ARCHIVE) | $(INSTALLED) ## Roll MODEL out to VERSION: register, smoke-test, make default
	@test -n "$(strip $(VERSION))" || { echo "usage: make deploy MODEL=digits VERSION=2.0"; exit 2; }
	$(PY) -m tsforge deploy $(MODEL) $(strip $(VERSION)) --run-dir $(RUN_DIR) --store $(STORE)

rollback: | $(INSTALLED) ## Make MODEL's previous default version the default again (TO=VERSION to pick one)
	$(PY) -m tsforge rollback $(MODEL) --run-dir $(RUN_DIR) $(if $(strip $(TO)),--to $(strip $(TO)))

undeploy: | $(INSTALLED) ## Unregister VERSION of MODEL (refused while it is the default)
	@test -n "$(strip $(VERSION))" || { echo "usage: make undeploy MODEL=digits VERSION=1.0"; exit 2; }
	$(PY) -m tsforge undeploy $(MODEL) $(strip $(VERSION)) --run-dir $(RUN_DIR)

deploy-status: | $(INSTALLED) ## MODEL's registered versions, the default, workers and deploy history
	$(PY) -m tsforge deploy-status $(MODEL) --run-dir $(RUN_DIR)

predict-grpc: | $(INSTALLED) ## Send MODEL's example inputs over gRPC (TorchServe's own protos)
	$(PY) -m tsforge grpc predict $(MODEL) --run-dir $(RUN_DIR) $(if $(strip $(VERSION)),--version $(strip $(VERSION)))

metrics: | $(INSTALLED) ## Health, per-model readiness and the important Prometheus metrics
	$(PY) -m tsforge metrics --run-dir $(RUN_DIR)

# ---- GPU bench ----
# On a GPU host, from a clean tree: exports and archives MODEL (resnet50) there, then serves tsforge and the stock
# handler side by side with the in-process ceiling. A host without TorchServe, a package index or scikit-learn
# takes them as files: GPU_BENCH_ARGS='--bundle TS.txz --wheels WHEEL_DIR --photos PHOTO_DIR' (loadtest/gpu_bench.py).
GPU_LEVELS   ?= 16,64,256
GPU_DURATION ?= 15
GPU_BENCH_ARGS ?=# e.g. --clients 8 --stock-duration 10
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_MODEL := $(if $(filter command line environment,$(origin MODEL)),$(MODEL),resnet50)

.PHONY: bench-startup
bench-startup: $(STORE)/resnet18.mar $(STORE)/digits.mar $(STORE)/minilm.mar | $(DEV_INSTALLED) ## Worker start with auto: the first measuring, one more reusing -> docs/data/startup.json
	$(PY) -m tsforge bench-startup --models resnet18,digits,minilm --out $(DATA)/startup.json

.PHONY: bench-front
bench-front: $(STORE)/resnet18.mar $(STORE)/digits.mar | $(DEV_INSTALLED) ## The v2 front's cost: v2 requests direct vs through it, c=16 -> reports/front-cost/
	$(PY) -m tsforge bench-front --models resnet18,digits --users 16 --out $(REPORTS)/front-cost \
		--data $(DATA)/front-cost.json

.PHONY: form-flood
form-flood: $(STORE)/digits.mar ## digits under 4 clients of 800,000-field form bodies: direct vs through the front -> reports/form-flood/
	$(PY) -m loadtest.form_flood --duration 30 --users 4 --flooders 4 --out $(REPORTS)/form-flood

.PHONY: bench-gpu
bench-gpu: ## GPU: tsforge vs stock handler vs in-process ceiling, GPU use sampled (GPU_LEVELS, GPU_DURATION) -> reports/gpu-bench/
	$(GPU_PY) -m tsforge bench-gpu --model $(GPU_MODEL) --levels $(GPU_LEVELS) --duration $(GPU_DURATION) \
		--out $(REPORTS)/gpu-bench $(GPU_BENCH_ARGS)

# `make test-gpu` gathers what a GPU host lacks (TorchServe + Java, wheels, MiniLM's weights, data in place of
# scikit-learn) into git-ignored folders of at most 64 MiB each and prints the device-tool calls: two that stage the
# weights' parts there, then the one that runs the CUDA tests and a served smoke test of every example model
# (loadtest/gpu_smoke.py; `--allow-cpu` runs the same steps without CUDA).
GPU_CARRY ?= $(BUILD)/gpu-carry

.PHONY: test-gpu
test-gpu: | $(INSTALLED) ## GPU: prepare the carry folder (GPU_CARRY) and print the device calls: CUDA tests + every model served -> test-gpu.json
	$(PY) -m loadtest.gpu_smoke prepare --carry $(GPU_CARRY)

# ---- KServe bundle, CI packaging ----
# `make kserve` writes build/kserve/ (storage layout, InferenceServices, DERIVATION.md; docs/scaling.md deploys it).
# `make package TAG=v0.1.0` is what .github/workflows/package.yml runs on a version tag, upload aside.
KSERVE_OUT  ?= $(BUILD)/kserve
KSERVE_ARGS ?=# e.g. --storage-uri s3://BUCKET/tsforge/0.1.0 --image REGISTRY/tsforge-torchserve:0.1.0 --max-replicas 8
TAG         ?=# the release tag being packaged (v0.1.0); it must name pyproject.toml's version

.PHONY: kserve check-tag package

kserve: $(ARCHIVES) ## KServe bundle of MODELS (KSERVE_OUT, KSERVE_ARGS) -> build/kserve/
	$(PY) -m tsforge kserve --out $(KSERVE_OUT) --store $(STORE) --models $(MODELS) $(KSERVE_ARGS)

check-tag: | $(INSTALLED) ## Fail unless TAG (v0.1.0) names pyproject.toml's version
	$(PY) -m tsforge release check-tag $(TAG)

package: ## CI on a version tag (TAG=v0.1.0): check the tag, archive, verify, test, KServe bundle
	$(MAKE) check-tag TAG=$(TAG)
	$(MAKE) archive
	$(MAKE) verify
	$(MAKE) test
	$(MAKE) kserve

# A release packages every example model with every variant (MODELS= on the command line picks others).
EXAMPLES := digits resnet18 minilm digits_tensor sentiment
package: export MODELS := $(if $(filter command line,$(origin MODELS)),$(MODELS),$(EXAMPLES))
package: export VARIANTS := $(VARIANTS)

# ---- reliability: soak ----
SOAK_DIGITS ?= 100000
SOAK_RESNET ?= 20000
SOAK_ARGS   ?=# e.g. --interval 2 --digits-users 8

.PHONY: soak
soak: $(STORE)/digits.mar $(STORE)/resnet18.mar | $(DEV_INSTALLED) ## Soak digits and resnet18 (SOAK_DIGITS, SOAK_RESNET requests), RSS over time -> reports/soak/, docs/data/soak.json
	$(PY) -m tsforge soak --digits-requests $(SOAK_DIGITS) --resnet18-requests $(SOAK_RESNET) \
		--store $(STORE) --out $(REPORTS)/soak --data $(DATA)/soak.json $(SOAK_ARGS)

# The fault, flood and bad-input tests with their figures written to the committed data (each passing scenario
# writes DATA/reliability/SCENARIO.json; alone, the tests write reports/reliability/); `make benchmarks-doc` then
# renders them into docs/reliability.md.
RELIABILITY_TESTS ?= tests/test_reliability.py tests/test_bad_input.py

.PHONY: reliability-data
reliability-data: $(ARCHIVES) | $(DEV_INSTALLED) ## Run the fault and bad-input tests, their figures -> docs/data/reliability/ (then make benchmarks-doc)
	TSFORGE_RELIABILITY_DATA=$(DATA)/reliability $(PY) -m pytest $(RELIABILITY_TESTS) $(PYTEST_ARGS)

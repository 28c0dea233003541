# syntax=docker/dockerfile:1.7
# One image for both services: `pagewire executor ...` and `pagewire scheduler ...` (docker-compose.yml).
#
# GPU (default): PyPI's Linux torch wheel, built for CUDA 13.0 (needs an NVIDIA driver >= 580), and the
# CuPy build of the same CUDA major for the CUDA ops backend.
# CPU: docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#                   --build-arg CUPY_PACKAGE= -t pagewire:cpu .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.13.0
ARG CUPY_PACKAGE="cupy-cuda13x[ctk]"
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/torch-constraint.txt
# Every later install runs under this constraint, so nothing can swap the torch build chosen here.
RUN python -m venv /opt/venv \
    && echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
# Dependencies before sources, so editing code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt grpcio-tools \
    && if [ -n "${CUPY_PACKAGE}" ]; then pip install "${CUPY_PACKAGE}"; fi

COPY . .
# The same generation as the Makefile's proto rule: generated code is built, never committed.
RUN mkdir -p shared/pb/pagewire/v1 \
    && set -- \
    && for proto in protos/pagewire/v1/*.proto; do set -- "$@" "shared/pb/${proto#protos/}"; done \
    && python -m grpc_tools.protoc -Ishared/pb=protos --python_out=. --pyi_out=. --grpc_python_out=. "$@" \
    && touch shared/pb/__init__.py shared/pb/pagewire/__init__.py shared/pb/pagewire/v1/__init__.py \
    && pip install --no-deps -e . \
    && pip uninstall -y grpcio-tools


FROM ${PYTHON_IMAGE} AS runtime
ARG PAGEWIRE_UID=1000
RUN useradd --uid "${PAGEWIRE_UID}" --create-home --shell /usr/sbin/nologin pagewire \
    && install -d -o pagewire -g pagewire /models /var/cache/pagewire/cupy
# The editable install points at /app, so the sources keep the path they were installed from.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

COPY --chmod=0755 <<'EOF' /usr/local/bin/pagewire-entrypoint
#!/bin/sh
# Runs `pagewire "$@"`; an executor asked to serve the tiny model creates it on first start.
set -eu
tiny_model="${PAGEWIRE_TINY_MODEL:-/models/tiny}"
tiny_model="${tiny_model%/}"
if [ "${1:-}" = executor ] && [ ! -f "$tiny_model/config.json" ]; then
    model=""
    previous=""
    for argument in "$@"; do
        case "$argument" in
            --model=*) model="${argument#--model=}" ;;
            *) if [ "$previous" = --model ]; then model="$argument"; fi ;;
        esac
        previous="$argument"
    done
    if [ "${model%/}" = "$tiny_model" ]; then
        # Built beside its final place and renamed in one step, so no reader ever sees half a model;
        # when a replica starting at the same time renames first, its copy wins and this one is dropped.
        mkdir -p "$(dirname "$tiny_model")"
        staging="$(mktemp -d "$(dirname "$tiny_model")/.tiny-model.XXXXXX")"
        pagewire create-tiny-model "$staging" > /dev/null
        chmod 0755 "$staging"
        if mv -T "$staging" "$tiny_model" 2> /dev/null; then
            echo "pagewire-entrypoint: created the tiny model in $tiny_model" >&2
        else
            rm -rf "$staging"
        fi
    fi
fi
exec pagewire "$@"
EOF

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PAGEWIRE_TINY_MODEL=/models/tiny \
    CUPY_CACHE_DIR=/var/cache/pagewire/cupy \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER pagewire
WORKDIR /app
VOLUME ["/models"]
# 50051: the scheduler's public Generation API; 50061: the executor's internal Executor API.
EXPOSE 50051 50061
ENTRYPOINT ["pagewire-entrypoint"]
CMD ["executor", "--model", "/models/tiny", "--host", "0.0.0.0", "--port", "50061"]

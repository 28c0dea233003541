"""`make gpu-check`: the GPU suite and the kernel benchmark on a lent GPU machine, results in one folder.

    python3 -m benchmarks.gpu_check --results-dir benchmarks/results

Runs from a fresh checkout on the GPU image (torch, CuPy, transformers and grpcio present; no network,
no grpcio-tools, no structlog) with `.gpu-bundle/` carried beside it, as `make gpu-bundle` prepares it
on the CPU machine: generated protobuf modules (`pb/`) and wheels (`wheels/`). The wheels are
installed with `--no-deps --target` into a scratch folder that is put first on PYTHONPATH for the
child processes. Writes `gpu-tests.log`, `gpu-tests.xml`, `kernels.log`, `kernels.md`, `kernels.json`
and `summary.md` into the results folder; exits non-zero when a GPU test fails or the benchmark breaks,
and at once when torch sees no CUDA device (unless `--rehearse`, which checks the bundle, the imports and
the test collection on a CPU machine).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".gpu-bundle"
SITE = Path("/tmp/pagewire-gpu-site")


def prepare_environment() -> dict[str, str]:
    """Puts the carried protobuf modules in place and installs the carried wheels; returns the child env."""
    if not BUNDLE.is_dir():
        raise SystemExit(
            f"{BUNDLE} is missing: run `make gpu-bundle` on the CPU machine and carry .gpu-bundle"
        )
    generated = REPO / "shared" / "pb"
    if not generated.is_dir():
        shutil.copytree(BUNDLE / "pb", generated)
    wheels = sorted(str(path) for path in (BUNDLE / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--target",
                str(SITE),
                *wheels,
            ],
            check=True,
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(command: list[str], log_path: Path, env: dict[str, str], timeout_s: int) -> int:
    """Runs `command` in the repo, echoing its output and saving it to `log_path`; returns its exit code."""
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            log.write(f"\nkilled after {timeout_s} s\n")
            return 124


def cuda_device_name() -> str | None:
    """The name of the CUDA device torch sees, or None."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def pytest_summary(log_text: str) -> str:
    lines = [
        line.strip("= ").strip()
        for line in log_text.splitlines()
        if re.search(r"\d+ (passed|failed|skipped|error)", line)
    ]
    return lines[-1] if lines else "no pytest summary line (see gpu-tests.log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tests-timeout", type=int, default=360, help="seconds for the GPU suite")
    parser.add_argument("--benchmark-timeout", type=int, default=180, help="seconds for the kernel benchmark")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="go through every step without a CUDA device (the GPU tests skip, the benchmark refuses)",
    )
    args = parser.parse_args(argv)
    results = args.results_dir if args.results_dir.is_absolute() else REPO / args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    device_name = cuda_device_name()
    if device_name is None and not args.rehearse:
        print("gpu-check needs a CUDA device and torch sees none (--rehearse runs the steps anyway)")
        return 2
    env = prepare_environment()
    tests_status = run_logged(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "tests/kernels",
            "-p",
            "no:cacheprovider",
            f"--junitxml={results / 'gpu-tests.xml'}",
        ],
        results / "gpu-tests.log",
        env,
        args.tests_timeout,
    )
    bench_status = run_logged(
        [sys.executable, "-m", "benchmarks.kernels", "--output-dir", str(results)],
        results / "kernels.log",
        env,
        args.benchmark_timeout,
    )
    table_path = results / "kernels.md"
    table = table_path.read_text(encoding="utf-8") if table_path.exists() else "(no benchmark table)"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    when = datetime.datetime.now(datetime.UTC)
    tests_line = pytest_summary((results / "gpu-tests.log").read_text())
    summary = "\n".join(
        [
            f"# GPU check {when:%Y-%m-%d %H:%M} UTC, commit {commit or 'unknown'}",
            "",
            f"Device: {device_name or 'none visible (rehearsal)'}",
            "",
            f"GPU suite (`pytest -m gpu tests/kernels`, exit {tests_status}): {tests_line}",
            f"Kernel benchmark (`python -m benchmarks.kernels`, exit {bench_status}):",
            "",
            table,
            "",
        ]
    )
    (results / "summary.md").write_text(summary, encoding="utf-8")
    print("\n" + summary)
    return 0 if tests_status == 0 and bench_status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

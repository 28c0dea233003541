"""vLLM's CPU build as a comparison peer: run by the vLLM virtual environment's Python, not pagewire's.

`python -P vllm_peer.py ENGINE_JSON` builds one offline `vllm.LLM` from the engine settings (model
directory, block size, KV cache bytes, batch limits; fp32, no tokenizer), then answers on its original
stdout, one JSON line each: first `{"vllm_version", "startup_s"}`, then for every workload line read from
stdin (`{"prompts": [[token ids]], "max_tokens": [n]}`) `{"duration_s", "outputs": [[token ids]]}`. It
exits at the end of stdin. Everything else printed, vLLM's logs included, goes to stderr, so the answers
stay parseable. Only the standard library and vLLM are imported: the file runs without pagewire. The
caller sets the environment vLLM reads at import (threads bound to cores, the allocator and OpenMP
preload); see `benchmarks/vllm_baseline.py`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO


def _answers() -> TextIO:
    """The original stdout, kept for the answers; fd 1 then points at stderr for everything else."""
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)
    return answers


def _engine(settings: dict[str, Any]):  # -> vllm.LLM
    from vllm import LLM

    return LLM(
        model=settings["model_dir"],
        skip_tokenizer_init=True,
        dtype="float32",
        block_size=settings["block_size"],
        kv_cache_memory_bytes=settings["kv_cache_bytes"],
        max_num_seqs=settings["max_num_seqs"],
        max_num_batched_tokens=settings["max_num_batched_tokens"],
        max_model_len=settings["max_model_len"],
        seed=0,
        enable_prefix_caching=True,
    )


def _params(max_tokens: int):  # -> vllm.SamplingParams
    from vllm import SamplingParams

    # detokenize=False: there is no tokenizer (token-id prompts), as in pagewire's comparison.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def run_workload(llm, job: dict[str, Any]) -> dict[str, Any]:
    """One warm-up request (the first prompt, 2 tokens), the prefix cache reset, then every prompt at once,
    timed: no run is served from an earlier run's blocks, as pagewire's fresh scheduler is not."""
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    params = [_params(n) for n in job["max_tokens"]]
    llm.generate(prompts[:1], [_params(2)], use_tqdm=False)
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache")
    begun = time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    duration_s = time.monotonic() - begun
    return {"duration_s": duration_s, "outputs": [list(o.outputs[0].token_ids) for o in outputs]}


def _answer(answers: TextIO, message: dict[str, Any]) -> None:
    answers.write(json.dumps(message) + "\n")
    answers.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -P vllm_peer.py ENGINE_JSON (workloads on stdin)", file=sys.stderr)
        return 2
    answers = _answers()
    with open(argv[0], encoding="utf-8") as file:
        settings = json.load(file)
    started = time.monotonic()
    llm = _engine(settings)
    import vllm

    _answer(answers, {"vllm_version": vllm.__version__, "startup_s": time.monotonic() - started})
    for line in iter(sys.stdin.readline, ""):
        _answer(answers, run_workload(llm, json.loads(line)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Every CUDA kernel instantiation compiles with NVRTC for sm_80 and sm_90, without a GPU, and spills nothing.

Programs compile once per session, (family, arch) pairs in parallel threads (ctypes releases the GIL).
Results are also kept in pytest's cache under a key covering the source, options, names, arch and
NVRTC version, so an unchanged kernel is not recompiled by the next local run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from executor_service.ops import cuda_kernels
from executor_service.ops.cuda_kernels import CHECKED_ARCHS, COMPILE_OPTIONS, FAMILIES, KernelFamily
from executor_service.ops.nvrtc import (
    KernelResources,
    NvrtcError,
    compile_cubin,
    nvrtc_version,
    parse_ptxas_report,
)

MAX_STATIC_SHARED_BYTES = 48 * 1024
Outcome = dict[str, KernelResources] | NvrtcError


def _cache_key(family: KernelFamily, arch: str) -> str:
    payload = json.dumps(
        [family.source(), COMPILE_OPTIONS, cuda_kernels.all_instantiations(family), arch, nvrtc_version()]
    )
    return "pagewire/nvrtc/" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def _compile(family: KernelFamily, arch: str) -> Outcome:
    try:
        program = compile_cubin(
            family.source(),
            family.source_file,
            arch,
            cuda_kernels.all_instantiations(family),
            COMPILE_OPTIONS,
        )
    except NvrtcError as error:
        return error
    return program.resources


@pytest.fixture(scope="session")
def compiled(pytestconfig: pytest.Config) -> dict[tuple[str, str], Outcome]:
    cache = getattr(pytestconfig, "cache", None)
    outcomes: dict[tuple[str, str], Outcome] = {}
    pending: list[tuple[KernelFamily, str]] = []
    for family in FAMILIES:
        for arch in CHECKED_ARCHS:
            stored = cache.get(_cache_key(family, arch), None) if cache else None
            if stored is not None:
                outcomes[family.name, arch] = {
                    name: KernelResources(*values) for name, values in stored.items()
                }
            else:
                pending.append((family, arch))
    # The big attention program first, so it overlaps the small ones.
    pending.sort(key=lambda job: -len(cuda_kernels.all_instantiations(job[0])))
    with ThreadPoolExecutor(max_workers=max(1, min(len(pending), os.cpu_count() or 1))) as pool:
        results = pool.map(lambda job: _compile(*job), pending)
        for (family, arch), outcome in zip(pending, results, strict=True):
            outcomes[family.name, arch] = outcome
            if cache is not None and not isinstance(outcome, NvrtcError):
                cache.set(
                    _cache_key(family, arch),
                    {
                        name: [
                            r.registers,
                            r.stack_frame_bytes,
                            r.spill_store_bytes,
                            r.spill_load_bytes,
                            r.shared_bytes,
                        ]
                        for name, r in outcome.items()
                    },
                )
    return outcomes


def _resources(
    compiled: dict[tuple[str, str], Outcome], family: KernelFamily, arch: str
) -> dict[str, KernelResources]:
    outcome = compiled[family.name, arch]
    if isinstance(outcome, NvrtcError):
        pytest.fail(f"{family.source_file} does not compile for {arch}:\n{outcome.log}", pytrace=False)
    return outcome


@pytest.mark.parametrize("arch", CHECKED_ARCHS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_every_instantiation_compiles_without_spills(compiled, family, arch):
    resources = _resources(compiled, family, arch)
    expected = cuda_kernels.all_instantiations(family)
    assert sorted(resources) == sorted(expected), "ptxas reported no resources for some instantiations"
    report = "\n".join(f"  {name}: {usage}" for name, usage in sorted(resources.items()))
    offenders = [
        name
        for name, usage in resources.items()
        if usage.spills or usage.stack_frame_bytes > 0 or usage.shared_bytes > MAX_STATIC_SHARED_BYTES
    ]
    assert not offenders, f"spills, local memory or > 48 KiB static shared memory on {arch}:\n{report}"


def test_attention_has_one_kernel_per_dtype_head_dim_and_block_size():
    names = cuda_kernels.all_instantiations(cuda_kernels.PAGED_ATTENTION)
    assert "paged_attention_kernel<pw_bf16, 128, 16>" in names
    assert "paged_attention_kernel<float, 16, 32>" in names
    assert "paged_attention_reduce_kernel<pw_half, 64>" in names
    assert len(names) == 3 * 3 * 3 + 3 * 3


def _constant(source_file: str, name: str) -> int:
    text = (cuda_kernels.KERNELS_DIR / source_file).read_text()
    match = re.search(rf"constexpr int {name} = (\d+);", text)
    assert match, f"{name} not found in {source_file}"
    return int(match.group(1))


def test_python_launch_constants_mirror_the_kernels():
    assert cuda_kernels.ATTENTION_THREADS == _constant("paged_attention.cu", "kPwAttentionThreads")
    assert cuda_kernels.ATTENTION_MAX_ROWS == _constant("paged_attention.cu", "kPwAttentionMaxRows")
    assert cuda_kernels.CACHE_WRITE_THREADS == _constant("cache_write.cu", "kPwCacheWriteThreads")
    assert cuda_kernels.BLOCK_COPY_THREADS == _constant("block_copy.cu", "kPwBlockCopyThreads")
    assert cuda_kernels.SGMV_THREADS == _constant("sgmv.cu", "kPwSgmvThreads")
    assert cuda_kernels.SGMV_TOKENS_PER_CTA == _constant("sgmv.cu", "kPwSgmvTokens")
    assert cuda_kernels.SGMV_MAX_RANK == _constant("sgmv.cu", "kPwSgmvMaxRank")
    assert cuda_kernels.SGMV_VECTORS_PER_LANE == _constant("sgmv.cu", "kPwSgmvVectorsPerLane")


def test_a_failed_compile_raises_with_the_compiler_log():
    source = "__global__ void broken(float* x) { x[0] = undeclared_name; }\n"
    with pytest.raises(NvrtcError) as raised:
        compile_cubin(source, "broken.cu", "sm_90", ("broken",))
    assert "undeclared_name" in raised.value.log
    assert "broken.cu" in str(raised.value)


def test_ptxas_report_is_parsed_per_kernel():
    source = (
        "__global__ void small(float* x) { x[threadIdx.x] *= 2.0f; }\n"
        "__global__ void shared(float* x) { __shared__ float s[256]; s[threadIdx.x] = x[threadIdx.x];"
        " __syncthreads(); x[threadIdx.x] = s[255 - threadIdx.x]; }\n"
    )
    program = compile_cubin(source, "tiny.cu", "sm_80", ("small", "shared"))
    assert program.cubin[:4] == b"\x7fELF"
    assert set(program.resources) == {"small", "shared"}
    assert program.resources["shared"].shared_bytes == 1024
    assert program.resources["small"].shared_bytes == 0
    assert 0 < program.resources["small"].registers <= 32
    assert parse_ptxas_report(program.log)[program.lowered_names["shared"]] == program.resources["shared"]

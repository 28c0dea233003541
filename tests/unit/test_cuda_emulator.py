"""The host emulator of CUDA kernels keeps CUDA's semantics and refuses what a GPU would hang or misread on.

The kernel suite (tests/kernels) trusts the emulator to run the real kernels faithfully on the CPU;
these tests check that trust on small kernels written here: barriers, shared memory, warp shuffles,
fp16/bf16 rounding against torch, and the argument checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.cuda_emulator.host_library import (
    EmulatorError,
    HostKernelLibrary,
    compiler_available,
    host_source_of,
)

pytestmark = pytest.mark.skipif(not compiler_available(), reason="the kernel emulator needs a C++ compiler")

SOURCE = r"""
#include "common.cuh"

// Thread t writes its id into shared memory; after the barrier it reads its neighbour's.
__global__ void rotate_kernel(int* out) {
  __shared__ int slots[256];
  const int tid = threadIdx.x;
  slots[tid] = tid + 1000 * blockIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + tid] = slots[(tid + 1) % blockDim.x];
}

// Each warp sums and maxes its lanes' values with butterfly shuffles.
__global__ void warp_reduce_kernel(float* sums, float* maxima, const float* in) {
  const int tid = threadIdx.x;
  const float value = in[tid];
  const float sum = pw_warp_sum(value);
  const float maximum = pw_warp_max(value);
  sums[tid] = sum;
  maxima[tid] = maximum;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    return;
  }
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void half_warp_shuffle_kernel(float* out) {
  float value = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    value = __shfl_xor_sync(0xffffffffu, value, 1);
  }
  out[threadIdx.x] = value;
}

__global__ void convert_kernel(unsigned short* half_bits, unsigned short* bf16_bits, float* half_back,
                               float* bf16_back, const float* in, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    half_bits[i] = (unsigned short)pw_float_to_half_bits(in[i]);
    bf16_bits[i] = (unsigned short)pw_float_to_bf16_bits(in[i]);
    half_back[i] = pw_half_bits_to_float(half_bits[i]);
    bf16_back[i] = pw_bf16_bits_to_float(bf16_bits[i]);
  }
}

__global__ void copy_async_kernel(float* out, const float* in, int offset) {
  __shared__ __align__(16) float staged[4];
  pw_cp_async_16(staged, in + offset, true);
  pw_cp_async_commit();
  pw_cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = staged[threadIdx.x];
}

__global__ void scale_kernel(float* data, long long count, float factor) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) {
    data[i] *= factor;
  }
}
"""
NAMES = (
    "rotate_kernel",
    "warp_reduce_kernel",
    "divergent_barrier_kernel",
    "half_warp_shuffle_kernel",
    "convert_kernel",
    "copy_async_kernel",
    "scale_kernel",
)


@pytest.fixture(scope="module")
def library() -> HostKernelLibrary:
    return HostKernelLibrary(host_source_of(SOURCE), NAMES)


def address(tensor: torch.Tensor) -> np.uint64:
    return np.uint64(tensor.data_ptr())


def test_shared_memory_is_shared_by_the_cta_and_barriers_order_it(library):
    out = torch.full((3 * 128,), -1, dtype=torch.int32)
    library.launch("rotate_kernel", (3, 1, 1), (128, 1, 1), (address(out),))
    expected = torch.tensor(
        [(t + 1) % 128 + 1000 * b for b in range(3) for t in range(128)], dtype=torch.int32
    )
    assert torch.equal(out, expected)


def test_warp_shuffles_reduce_each_warp_separately(library):
    values = torch.randn(96, generator=torch.Generator().manual_seed(0))
    sums, maxima = torch.empty(96), torch.empty(96)
    library.launch(
        "warp_reduce_kernel", (1, 1, 1), (96, 1, 1), (address(sums), address(maxima), address(values))
    )
    warps = values.view(3, 32)
    assert torch.allclose(sums.view(3, 32), warps.sum(1, keepdim=True).expand(3, 32), atol=1e-5)
    assert torch.equal(maxima.view(3, 32), warps.amax(1, keepdim=True).expand(3, 32))


def test_a_barrier_some_threads_never_reach_is_reported(library):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(EmulatorError, match=r"deadlock in CTA \(0, 0, 0\): 48 threads wait at __syncthreads"):
        library.launch("divergent_barrier_kernel", (1, 1, 1), (64, 1, 1), (address(out),))


def test_a_shuffle_half_a_warp_skips_is_reported(library):
    out = torch.zeros(32)
    with pytest.raises(EmulatorError, match="16 at a warp shuffle that 16 exited threads"):
        library.launch("half_warp_shuffle_kernel", (1, 1, 1), (32, 1, 1), (address(out),))


def test_fp16_and_bf16_rounding_matches_torch(library):
    generator = torch.Generator().manual_seed(1)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            65504.0,
            65519.0,
            65520.0,
            1e6,
            -1e6,
            2.0**-14,
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            1e-30,
            1 + 2.0**-11,
            1 + 3 * 2.0**-11,
            1 + 2.0**-8,
            1 + 3 * 2.0**-8,
            float("inf"),
            float("-inf"),
        ]
    )
    wide = torch.randn(4000, generator=generator) * torch.pow(
        2.0, torch.randint(-30, 20, (4000,), generator=generator)
    )
    values = torch.cat([special, wide, torch.randn(2000, generator=generator) * 1e-6])
    n = values.numel()
    half_bits = torch.empty(n, dtype=torch.int16)
    bf16_bits = torch.empty(n, dtype=torch.int16)
    half_back, bf16_back = torch.empty(n), torch.empty(n)
    library.launch(
        "convert_kernel",
        (-(-n // 128), 1, 1),
        (128, 1, 1),
        (
            address(half_bits),
            address(bf16_bits),
            address(half_back),
            address(bf16_back),
            address(values),
            np.int32(n),
        ),
    )
    assert torch.equal(half_bits, values.half().view(torch.int16))
    assert torch.equal(bf16_bits, values.bfloat16().view(torch.int16))
    assert torch.equal(half_back, values.half().float())
    assert torch.equal(bf16_back, values.bfloat16().float())


def test_nan_converts_to_the_canonical_nan(library):
    values = torch.tensor([float("nan")])
    half_bits, bf16_bits = torch.empty(1, dtype=torch.int16), torch.empty(1, dtype=torch.int16)
    half_back, bf16_back = torch.empty(1), torch.empty(1)
    library.launch(
        "convert_kernel",
        (1, 1, 1),
        (32, 1, 1),
        (
            address(half_bits),
            address(bf16_bits),
            address(half_back),
            address(bf16_back),
            address(values),
            np.int32(1),
        ),
    )
    assert half_bits.item() == 0x7FFF and bf16_bits.item() == 0x7FFF
    assert torch.isnan(half_back).all() and torch.isnan(bf16_back).all()


def test_arguments_must_match_the_kernel_parameters(library):
    data = torch.ones(10)
    library.launch("scale_kernel", (1, 1, 1), (32, 1, 1), (address(data), np.int64(10), np.float32(3.0)))
    assert torch.equal(data, torch.full((10,), 3.0))
    with pytest.raises(
        EmulatorError, match="argument 1: a int32 value for a parameter of kind 'i' and 8 bytes"
    ):
        library.launch("scale_kernel", (1, 1, 1), (32, 1, 1), (address(data), np.int32(10), np.float32(3.0)))
    with pytest.raises(EmulatorError, match="argument 2: a float64 value"):
        library.launch("scale_kernel", (1, 1, 1), (32, 1, 1), (address(data), np.int64(10), np.float64(3.0)))
    with pytest.raises(EmulatorError, match="takes 3 arguments, got 2"):
        library.launch("scale_kernel", (1, 1, 1), (32, 1, 1), (address(data), np.int64(10)))
    with pytest.raises(EmulatorError, match="a CTA must have 1..1024 threads"):
        library.launch(
            "scale_kernel", (1, 1, 1), (2048, 1, 1), (address(data), np.int64(10), np.float32(1.0))
        )
    assert torch.equal(data, torch.full((10,), 3.0))


def test_cp_async_copies_16_aligned_bytes_and_refuses_misaligned_ones(library):
    source, out = torch.arange(8, dtype=torch.float32), torch.zeros(4)
    library.launch("copy_async_kernel", (1, 1, 1), (4, 1, 1), (address(out), address(source), np.int32(4)))
    assert torch.equal(out, torch.tensor([4.0, 5.0, 6.0, 7.0]))
    with pytest.raises(
        EmulatorError, match="cp.async of 16 bytes from/to an address that is not 16-byte aligned"
    ):
        library.launch(
            "copy_async_kernel", (1, 1, 1), (4, 1, 1), (address(out), address(source), np.int32(1))
        )

// Every inline PTX the kernels use, in one place: fp16/bf16 conversions and cp.async. A host build of
// the kernels (the CPU emulator in tests/helpers/cuda_emulator) substitutes plain C++ for this file.
#pragma once

__device__ __forceinline__ float pw_half_bits_to_float(unsigned int bits) {
  float value;
  asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"((unsigned short)bits));
  return value;
}

__device__ __forceinline__ unsigned int pw_float_to_half_bits(float value) {
  unsigned short bits;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
  return bits;
}

__device__ __forceinline__ unsigned int pw_float_to_bf16_bits(float value) {
  unsigned short bits;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
  return bits;
}

// 16-byte global -> shared copy that bypasses L1; when `valid` is false it reads nothing and
// writes zeros, so masked keys and values are finite (0 * NaN would survive masking).
__device__ __forceinline__ void pw_cp_async_16(void* shared_dst, const void* global_src, bool valid) {
  const unsigned int dst = (unsigned int)__cvta_generic_to_shared(shared_dst);
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes));
}

__device__ __forceinline__ void pw_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void pw_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

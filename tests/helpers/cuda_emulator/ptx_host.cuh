// Host C++ for kernels/ptx.cuh: the same conversions and copies, without inline PTX.
// fp16 and bf16 round to nearest even like cvt.rn; cp.async becomes a synchronous copy that checks
// the 16-byte alignment the instruction requires.
#pragma once

__device__ __forceinline__ float pw_half_bits_to_float(unsigned int bits) {
  const unsigned int sign = (bits & 0x8000u) << 16;
  const unsigned int exponent = (bits >> 10) & 0x1fu;
  const unsigned int mantissa = bits & 0x3ffu;
  if (exponent == 0x1fu) {
    return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent != 0) {
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  const float magnitude = (float)mantissa * 5.9604644775390625e-08f;  // 2^-24: subnormal or zero
  return sign != 0 ? -magnitude : magnitude;
}

__device__ __forceinline__ unsigned int pw_float_to_half_bits(float value) {
  const unsigned int bits = __float_as_uint(value);
  const unsigned int sign = (bits >> 16) & 0x8000u;
  const unsigned int magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) {
    return 0x7fffu;  // the canonical NaN of cvt.rn.f16.f32
  }
  if (magnitude >= 0x477ff000u) {
    return sign | 0x7c00u;  // rounds to infinity (65520 and up)
  }
  if (magnitude < 0x38800000u) {  // below 2^-14: subnormal half, exact rounding through float
    const float scaled = __uint_as_float(magnitude) * 16777216.0f;  // * 2^24
    return sign | (unsigned int)nearbyintf(scaled);
  }
  const unsigned int rounded = magnitude + 0x0fffu + ((magnitude >> 13) & 1u);
  return sign | ((rounded - 0x38000000u) >> 13);
}

__device__ __forceinline__ unsigned int pw_float_to_bf16_bits(float value) {
  const unsigned int bits = __float_as_uint(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return 0x7fffu;  // the canonical NaN cvt.rn.bf16.f32 produces
  }
  return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ void pw_cp_async_16(void* shared_dst, const void* global_src, bool valid) {
  if ((uintptr_t)shared_dst % 16 != 0 || (valid && (uintptr_t)global_src % 16 != 0)) {
    pw_emu::fail("cp.async of 16 bytes from/to an address that is not 16-byte aligned");
  }
  if (valid) {
    memcpy(shared_dst, global_src, 16);
  } else {
    memset(shared_dst, 0, 16);
  }
}

__device__ __forceinline__ void pw_cp_async_commit() {}

template <int kPending>
__device__ __forceinline__ void pw_cp_async_wait() {}

// Helpers shared by every kernel family: the three storage dtypes, 16-byte vector (un)packing and
// warp reductions. The Python loader pastes this file and ptx.cuh in place of their #include lines,
// so kernels compile with NVRTC alone: no CUDA headers, no CuPy headers.
#pragma once

#include "ptx.cuh"

// fp16 and bf16 as raw bits: the CUDA half headers are not available to NVRTC everywhere,
// and every kernel computes in fp32 anyway.
struct __align__(2) pw_half {
  unsigned short bits;
};
struct __align__(2) pw_bf16 {
  unsigned short bits;
};

__device__ __forceinline__ float pw_bf16_bits_to_float(unsigned int bits) {
  return __uint_as_float((bits & 0xffffu) << 16);
}

__device__ __forceinline__ unsigned int pw_word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ float pw_negative_infinity() { return __int_as_float(0xff800000); }

// Storage dtype traits. kVec elements make one 16-byte vector; unpack/pack convert such a vector
// to and from fp32 (round to nearest even).
template <typename T>
struct PwDtype;

template <>
struct PwDtype<float> {
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float to_float(float value) { return value; }
  static __device__ __forceinline__ float from_float(float value) { return value; }
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* in) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]),
                      __float_as_uint(in[3]));
  }
};

template <typename T, bool kIsBf16>
struct PwHalfWidthDtype {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float bits_to_float(unsigned int bits) {
    if constexpr (kIsBf16) {
      return pw_bf16_bits_to_float(bits);
    } else {
      return pw_half_bits_to_float(bits);
    }
  }
  static __device__ __forceinline__ unsigned int float_to_bits(float value) {
    if constexpr (kIsBf16) {
      return pw_float_to_bf16_bits(value);
    } else {
      return pw_float_to_half_bits(value);
    }
  }
  static __device__ __forceinline__ float to_float(T value) { return bits_to_float(value.bits); }
  static __device__ __forceinline__ T from_float(float value) {
    T result;
    result.bits = (unsigned short)float_to_bits(value);
    return result;
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* out) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned int word = pw_word(v, i);
      out[2 * i] = bits_to_float(word & 0xffffu);
      out[2 * i + 1] = bits_to_float(word >> 16);
    }
  }
  static __device__ __forceinline__ uint4 pack(const float* in) {
    unsigned int words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      words[i] = float_to_bits(in[2 * i]) | (float_to_bits(in[2 * i + 1]) << 16);
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
};

template <>
struct PwDtype<pw_half> : PwHalfWidthDtype<pw_half, false> {};
template <>
struct PwDtype<pw_bf16> : PwHalfWidthDtype<pw_bf16, true> {};

__device__ __forceinline__ float pw_warp_max(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

__device__ __forceinline__ float pw_warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

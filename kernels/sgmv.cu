// SGMV (segmented gather matrix-vector) for batched multi-LoRA. The batch's tokens form segments of
// consecutive rows; segment s uses adapter slot slot_ids[s] (negative: no adapter). Per segment,
//   shrink:  out[t, :rank]  += scale * x[t, :in] @ lora_a[slot]^T     (lora_a [num_slots, rank, in])
//   expand:  y[t, :out]     += v[t, :rank] @ lora_b[slot]^T           (lora_b [num_slots, out, rank])
// The shrink output is fp32 and must be zeroed before the launch: the input dimension is split over
// CTAs that add their partial dot products atomically.
#include "common.cuh"

constexpr int kPwSgmvThreads = 128;
constexpr int kPwSgmvWarps = kPwSgmvThreads / 32;
constexpr int kPwSgmvTokens = 16;  // tokens of one segment per CTA
constexpr int kPwSgmvMaxRank = 128;
constexpr int kPwSgmvVectorsPerLane = 2;

template <typename T>
struct PwSgmvShape {
  static constexpr int kVec = PwDtype<T>::kVec;
  static constexpr int kChunkVectors = 32 * kPwSgmvVectorsPerLane;  // input slice of one CTA, in vectors
  static constexpr int kChunk = kChunkVectors * kVec;                 // ... and in elements
};

// Grid: (num_segments, ceil(in_features / PwSgmvShape<T>::kChunk), ceil(max_segment_len / kPwSgmvTokens));
// block: kPwSgmvThreads. Needs in_features % kVec == 0 and 16-byte aligned rows.
template <typename T>
__global__ void __launch_bounds__(kPwSgmvThreads)
    sgmv_shrink_kernel(float* __restrict__ out, const T* __restrict__ x, const T* __restrict__ lora_a,
                       const int* __restrict__ segment_starts, const int* __restrict__ slot_ids,
                       long long x_token_stride, int in_features, int rank, float scale) {
  using Dtype = PwDtype<T>;
  using Shape = PwSgmvShape<T>;
  constexpr int kVec = Shape::kVec;
  __shared__ uint4 x_tile[kPwSgmvTokens][Shape::kChunkVectors];

  const int segment = blockIdx.x;
  const int slot = slot_ids[segment];
  const int segment_end = segment_starts[segment + 1];
  const int first_token = segment_starts[segment] + blockIdx.z * kPwSgmvTokens;
  if (slot < 0 || first_token >= segment_end) {
    return;
  }
  const int num_tokens = min(kPwSgmvTokens, segment_end - first_token);
  const int chunk_start = blockIdx.y * Shape::kChunk;
  const int tid = threadIdx.x;
  const int lane = tid % 32;

  for (int i = tid; i < num_tokens * Shape::kChunkVectors; i += kPwSgmvThreads) {
    const int t = i / Shape::kChunkVectors;
    const int v = i % Shape::kChunkVectors;
    const int k = chunk_start + v * kVec;
    x_tile[t][v] = k < in_features
                       ? *reinterpret_cast<const uint4*>(x + (long long)(first_token + t) * x_token_stride + k)
                       : make_uint4(0u, 0u, 0u, 0u);
  }
  __syncthreads();

  for (int r = tid / 32; r < rank; r += kPwSgmvWarps) {
    const T* a_row = lora_a + ((long long)slot * rank + r) * in_features;
    float a_values[kPwSgmvVectorsPerLane][kVec];
#pragma unroll
    for (int v = 0; v < kPwSgmvVectorsPerLane; ++v) {
      const int k = chunk_start + (v * 32 + lane) * kVec;
      const uint4 packed = k < in_features ? *reinterpret_cast<const uint4*>(a_row + k) : make_uint4(0u, 0u, 0u, 0u);
      Dtype::unpack(packed, a_values[v]);
    }
    for (int t = 0; t < num_tokens; ++t) {
      float dot = 0.0f;
#pragma unroll
      for (int v = 0; v < kPwSgmvVectorsPerLane; ++v) {
        float x_values[kVec];
        Dtype::unpack(x_tile[t][v * 32 + lane], x_values);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          dot += a_values[v][e] * x_values[e];
        }
      }
      dot = pw_warp_sum(dot);
      if (lane == 0) {
        atomicAdd(out + (long long)(first_token + t) * rank + r, dot * scale);
      }
    }
  }
}

// Grid: (num_segments, ceil(out_features / kPwSgmvThreads), ceil(max_segment_len / kPwSgmvTokens));
// block: kPwSgmvThreads, one output feature each. Needs rank % kVec == 0 and rank <= kPwSgmvMaxRank.
// `y` rows are `y_token_stride` elements apart, so a column slice of a fused projection works in place.
template <typename T>
__global__ void __launch_bounds__(kPwSgmvThreads)
    sgmv_expand_kernel(T* __restrict__ y, const float* __restrict__ v, const T* __restrict__ lora_b,
                       const int* __restrict__ segment_starts, const int* __restrict__ slot_ids,
                       long long y_token_stride, int out_features, int rank) {
  using Dtype = PwDtype<T>;
  constexpr int kVec = Dtype::kVec;
  __shared__ __align__(16) float v_tile[kPwSgmvTokens][kPwSgmvMaxRank];

  const int segment = blockIdx.x;
  const int slot = slot_ids[segment];
  const int segment_end = segment_starts[segment + 1];
  const int first_token = segment_starts[segment] + blockIdx.z * kPwSgmvTokens;
  if (slot < 0 || first_token >= segment_end) {
    return;
  }
  const int num_tokens = min(kPwSgmvTokens, segment_end - first_token);
  for (int i = threadIdx.x; i < num_tokens * rank; i += kPwSgmvThreads) {
    v_tile[i / rank][i % rank] = v[(long long)first_token * rank + i];
  }
  __syncthreads();

  const int feature = blockIdx.y * kPwSgmvThreads + threadIdx.x;
  if (feature >= out_features) {
    return;
  }
  const T* b_row = lora_b + ((long long)slot * out_features + feature) * rank;
  float acc[kPwSgmvTokens];
#pragma unroll
  for (int t = 0; t < kPwSgmvTokens; ++t) {
    acc[t] = 0.0f;
  }
  for (int r = 0; r < rank; r += kVec) {
    float b_values[kVec];
    Dtype::unpack(*reinterpret_cast<const uint4*>(b_row + r), b_values);
#pragma unroll
    for (int t = 0; t < kPwSgmvTokens; ++t) {
      if (t < num_tokens) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          acc[t] += v_tile[t][r + e] * b_values[e];
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kPwSgmvTokens; ++t) {
    if (t < num_tokens) {
      T* target = y + (long long)(first_token + t) * y_token_stride + feature;
      *target = Dtype::from_float(Dtype::to_float(*target) + acc[t]);
    }
  }
}

// Paged attention over the flattened varlen batch (see executor_service/attention_metadata.py):
// decode rows and prefill-chunk rows in one launch, causal within the new tokens, full over the cached
// prefix, GQA, online softmax in fp32, and an optional split of the context (flash decoding) whose
// partial results paged_attention_reduce_kernel combines.
//
// One CTA computes one work item (a run of consecutive query tokens of one sequence) for one KV head
// and one context partition. Its "rows" are the (token, query head) pairs of that item that read the
// KV head: row m = token_in_item * group + head_in_group, at most kPwAttentionMaxRows of them, so the
// K/V of the partition are read from memory once for the whole GQA group. K/V tiles of kKeys tokens
// stream into shared memory through double-buffered 16-byte cp.async copies.
#include "common.cuh"

constexpr int kPwAttentionThreads = 128;
constexpr int kPwAttentionWarps = kPwAttentionThreads / 32;
constexpr int kPwAttentionMaxRows = 16;
// Static shared memory stays under the 48 KiB a CTA gets without an opt-in.
constexpr int kPwAttentionSharedBudget = 48 * 1024 - 512;
// Shared memory allows about 4 CTAs per SM on Hopper; saying so lets ptxas use up to 128 registers
// instead of capping them at the shared-memory occupancy (which spilled fp32 with head dim 128).
constexpr int kPwAttentionMinBlocksPerSm = 4;

__host__ __device__ constexpr int pw_attention_tile_keys(int bytes_per_key, int fixed_bytes) {
  int keys = 64;
  while (keys > 8 && fixed_bytes + keys * bytes_per_key > kPwAttentionSharedBudget) {
    keys /= 2;
  }
  return keys;
}

template <typename T, int kHeadDim>
struct PwAttentionShape {
  static constexpr int kVec = PwDtype<T>::kVec;
  static constexpr int kChunks = kHeadDim / kVec;  // 16-byte chunks per head vector
  // One 16-byte pad per key row: lanes that read different keys at the same chunk hit different banks.
  static constexpr int kRowBytes = kHeadDim * (int)sizeof(T) + 16;
  static constexpr int kQueryBytes = kPwAttentionMaxRows * kHeadDim * 4;
  static constexpr int kKeys =
      pw_attention_tile_keys(4 * kRowBytes + 4 * kPwAttentionMaxRows, kQueryBytes + 12 * kPwAttentionMaxRows);
  // Score phase: thread -> (key, row group); each thread scores kScoreRows rows against one key.
  static constexpr int kScoreGroups = kPwAttentionThreads / kKeys;
  static constexpr int kScoreRows = (kPwAttentionMaxRows + kScoreGroups - 1) / kScoreGroups;
  // Value phase: thread -> (chunk of the head dim, row group); it accumulates kValueRows rows.
  static constexpr int kValueGroups = kPwAttentionThreads / kChunks;
  static constexpr int kValueRows = (kPwAttentionMaxRows + kValueGroups - 1) / kValueGroups;

  static_assert(kHeadDim % kVec == 0, "head dim must be a whole number of 16-byte vectors");
  static_assert(kPwAttentionThreads % kKeys == 0, "threads must split evenly over the keys of a tile");
  static_assert(kPwAttentionThreads % kChunks == 0, "threads must split evenly over the head-dim chunks");
};

// Grid: (num_work_items, num_kv_heads, num_splits); block: kPwAttentionThreads.
// work_items[i] = (sequence index, first query row within the sequence, number of query rows).
// With num_splits == 1, partial_* are null and normalised rows go to `out`. Otherwise every CTA writes
// its unnormalised accumulator and its (max, sum) in the log2 domain for all of its rows, also when
// its partition holds no visible key (sum 0, max -inf), and the reduce kernel writes `out`.
template <typename T, int kHeadDim, int kBlockSize>
__global__ void __launch_bounds__(kPwAttentionThreads, kPwAttentionMinBlocksPerSm)
    paged_attention_kernel(T* __restrict__ out, float* __restrict__ partial_out,
                           float* __restrict__ partial_max, float* __restrict__ partial_sum,
                           const T* __restrict__ query, const T* __restrict__ key_cache,
                           const T* __restrict__ value_cache, const int* __restrict__ block_tables,
                           const int* __restrict__ query_start_loc, const int* __restrict__ context_lens,
                           const int* __restrict__ work_items, long long query_token_stride, int num_heads,
                           int num_kv_heads, int block_table_stride, int num_tokens, int partition_tokens,
                           float scale_log2) {
  using Dtype = PwDtype<T>;
  using Shape = PwAttentionShape<T, kHeadDim>;
  constexpr int kVec = Shape::kVec;
  constexpr int kChunks = Shape::kChunks;
  constexpr int kKeys = Shape::kKeys;
  constexpr int kRowBytes = Shape::kRowBytes;
  constexpr int kTileBytes = kKeys * kRowBytes;

  __shared__ __align__(16) float query_rows[kPwAttentionMaxRows][kHeadDim];
  __shared__ __align__(16) unsigned char kv_tiles[2][2][kTileBytes];  // [stage][key or value]
  __shared__ float scores[kPwAttentionMaxRows][kKeys];
  __shared__ float row_max[kPwAttentionMaxRows];
  __shared__ float row_sum[kPwAttentionMaxRows];
  __shared__ float row_rescale[kPwAttentionMaxRows];

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int kv_head = blockIdx.y;
  const int split = blockIdx.z;
  const int seq = work_items[3 * blockIdx.x];
  const int first_row = work_items[3 * blockIdx.x + 1];
  const int num_rows_in_item = work_items[3 * blockIdx.x + 2];
  const int group = num_heads / num_kv_heads;
  const int num_rows = num_rows_in_item * group;
  const int query_start = query_start_loc[seq];
  const int query_len = query_start_loc[seq + 1] - query_start;
  const int context_len = context_lens[seq];
  // Position of the item's first token; token r of the item sees positions <= first_position + r.
  const int first_position = context_len - query_len + first_row;
  const int kv_begin = split * partition_tokens;
  const int kv_end = min(first_position + num_rows_in_item, kv_begin + partition_tokens);
  const int* table = block_tables + (long long)seq * block_table_stride;

  auto load_tile = [&](int stage, int tile_start) {
    for (int i = tid; i < kKeys * kChunks; i += kPwAttentionThreads) {
      const int key = i / kChunks;
      const int chunk = i % kChunks;
      const int position = tile_start + key;
      const bool valid = position < kv_end;
      long long offset = 0;
      if (valid) {
        const long long block_id = table[position / kBlockSize];
        offset = ((block_id * kBlockSize + position % kBlockSize) * num_kv_heads + kv_head) * kHeadDim +
                 chunk * kVec;
      }
      const int shared_offset = key * kRowBytes + chunk * 16;
      pw_cp_async_16(&kv_tiles[stage][0][shared_offset], key_cache + offset, valid);
      pw_cp_async_16(&kv_tiles[stage][1][shared_offset], value_cache + offset, valid);
    }
    pw_cp_async_commit();
  };

  if (kv_begin < kv_end) {
    load_tile(0, kv_begin);
  }
  if (tid < kPwAttentionMaxRows) {
    row_max[tid] = pw_negative_infinity();
    row_sum[tid] = 0.0f;
  }
  for (int i = tid; i < num_rows * kChunks; i += kPwAttentionThreads) {
    const int row = i / kChunks;
    const int chunk = i % kChunks;
    const long long token = query_start + first_row + row / group;
    const int head = kv_head * group + row % group;
    const uint4 packed =
        *reinterpret_cast<const uint4*>(query + token * query_token_stride + (long long)head * kHeadDim + chunk * kVec);
    float values[kVec];
    Dtype::unpack(packed, values);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      query_rows[row][chunk * kVec + e] = values[e] * scale_log2;
    }
  }
  __syncthreads();

  const int score_key = tid % kKeys;
  const int score_group = tid / kKeys;
  const int value_chunk = tid % kChunks;
  const int value_group = tid / kChunks;
  float acc[Shape::kValueRows][kVec];
#pragma unroll
  for (int j = 0; j < Shape::kValueRows; ++j) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      acc[j][e] = 0.0f;
    }
  }

  int stage = 0;
  for (int tile_start = kv_begin; tile_start < kv_end; tile_start += kKeys) {
    if (tile_start + kKeys < kv_end) {
      load_tile(stage ^ 1, tile_start + kKeys);
      pw_cp_async_wait<1>();
    } else {
      pw_cp_async_wait<0>();
    }
    __syncthreads();

    const unsigned char* key_tile = kv_tiles[stage][0];
    float dots[Shape::kScoreRows];
#pragma unroll
    for (int j = 0; j < Shape::kScoreRows; ++j) {
      dots[j] = 0.0f;
    }
#pragma unroll
    for (int chunk = 0; chunk < kChunks; ++chunk) {
      float key_values[kVec];
      Dtype::unpack(*reinterpret_cast<const uint4*>(key_tile + score_key * kRowBytes + chunk * 16), key_values);
#pragma unroll
      for (int j = 0; j < Shape::kScoreRows; ++j) {
        const int row = score_group + j * Shape::kScoreGroups;
        if (row < num_rows) {
#pragma unroll
          for (int e = 0; e < kVec; e += 4) {
            const float4 q = *reinterpret_cast<const float4*>(&query_rows[row][chunk * kVec + e]);
            dots[j] += q.x * key_values[e] + q.y * key_values[e + 1] + q.z * key_values[e + 2] +
                       q.w * key_values[e + 3];
          }
        }
      }
    }
    const int key_position = tile_start + score_key;
#pragma unroll
    for (int j = 0; j < Shape::kScoreRows; ++j) {
      const int row = score_group + j * Shape::kScoreGroups;
      if (row < kPwAttentionMaxRows) {
        const bool visible =
            row < num_rows && key_position < kv_end && key_position <= first_position + row / group;
        scores[row][score_key] = visible ? dots[j] : pw_negative_infinity();
      }
    }
    __syncthreads();

    for (int row = warp; row < num_rows; row += kPwAttentionWarps) {
      float tile_max = pw_negative_infinity();
      for (int key = lane; key < kKeys; key += 32) {
        tile_max = fmaxf(tile_max, scores[row][key]);
      }
      tile_max = pw_warp_max(tile_max);
      const float old_max = row_max[row];
      const float new_max = fmaxf(old_max, tile_max);
      const bool any_visible = new_max != pw_negative_infinity();
      float tile_sum = 0.0f;
      for (int key = lane; key < kKeys; key += 32) {
        const float p = any_visible ? exp2f(scores[row][key] - new_max) : 0.0f;
        scores[row][key] = p;
        tile_sum += p;
      }
      tile_sum = pw_warp_sum(tile_sum);
      if (lane == 0) {
        const float rescale = old_max == pw_negative_infinity() ? 0.0f : exp2f(old_max - new_max);
        row_rescale[row] = rescale;
        row_sum[row] = row_sum[row] * rescale + tile_sum;
        row_max[row] = new_max;
      }
    }
    __syncthreads();

    if (value_group < num_rows) {
      const unsigned char* value_tile = kv_tiles[stage][1];
#pragma unroll
      for (int j = 0; j < Shape::kValueRows; ++j) {
        const int row = value_group + j * Shape::kValueGroups;
        if (row < num_rows) {
          const float rescale = row_rescale[row];
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            acc[j][e] *= rescale;
          }
        }
      }
#pragma unroll 4
      for (int key = 0; key < kKeys; ++key) {
        float values[kVec];
        Dtype::unpack(*reinterpret_cast<const uint4*>(value_tile + key * kRowBytes + value_chunk * 16), values);
#pragma unroll
        for (int j = 0; j < Shape::kValueRows; ++j) {
          const int row = value_group + j * Shape::kValueGroups;
          if (row < num_rows) {
            const float p = scores[row][key];
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              acc[j][e] += p * values[e];
            }
          }
        }
      }
    }
    __syncthreads();
    stage ^= 1;
  }

  if (value_group >= num_rows) {
    return;
  }
#pragma unroll
  for (int j = 0; j < Shape::kValueRows; ++j) {
    const int row = value_group + j * Shape::kValueGroups;
    if (row < num_rows) {
      const long long token = query_start + first_row + row / group;
      const int head = kv_head * group + row % group;
      const long long out_row = token * num_heads + head;
      if (partial_out == nullptr) {
        const float sum = row_sum[row];
        const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
        float normalised[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          normalised[e] = acc[j][e] * inverse;
        }
        *reinterpret_cast<uint4*>(out + out_row * kHeadDim + value_chunk * kVec) = Dtype::pack(normalised);
      } else {
        const long long partial_row = (long long)split * num_tokens * num_heads + out_row;
        float* destination = partial_out + partial_row * kHeadDim + value_chunk * kVec;
#pragma unroll
        for (int e = 0; e < kVec; e += 4) {
          *reinterpret_cast<float4*>(destination + e) = make_float4(acc[j][e], acc[j][e + 1], acc[j][e + 2], acc[j][e + 3]);
        }
        if (value_chunk == 0) {
          partial_max[partial_row] = row_max[row];
          partial_sum[partial_row] = row_sum[row];
        }
      }
    }
  }
}

// Grid: (num_tokens * num_heads); block: kHeadDim threads, one per output element.
// Combines the num_splits partial results of each (token, head) row written by paged_attention_kernel.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kHeadDim)
    paged_attention_reduce_kernel(T* __restrict__ out, const float* __restrict__ partial_out,
                                  const float* __restrict__ partial_max, const float* __restrict__ partial_sum,
                                  int num_rows, int num_splits) {
  const long long row = blockIdx.x;
  const int d = threadIdx.x;
  float global_max = pw_negative_infinity();
  for (int split = 0; split < num_splits; ++split) {
    global_max = fmaxf(global_max, partial_max[(long long)split * num_rows + row]);
  }
  float total = 0.0f;
  float value = 0.0f;
  for (int split = 0; split < num_splits; ++split) {
    const long long partial_row = (long long)split * num_rows + row;
    const float split_max = partial_max[partial_row];
    if (split_max != pw_negative_infinity()) {
      const float weight = exp2f(split_max - global_max);
      total += weight * partial_sum[partial_row];
      value += weight * partial_out[partial_row * kHeadDim + d];
    }
  }
  out[row * kHeadDim + d] = PwDtype<T>::from_float(total > 0.0f ? value / total : 0.0f);
}

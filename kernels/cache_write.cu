// Writes the new tokens' K and V into their cache slots (slot = block id * block size + offset): the
// cache is [num_blocks, block_size, num_kv_heads, head_dim], so a slot's K (or V) is one contiguous
// row of num_kv_heads * head_dim elements and the write is a row gather-scatter in 16-byte vectors.
#include "common.cuh"

constexpr int kPwCacheWriteThreads = 128;

// Grid: (num_tokens, 2), blockIdx.y 0 writes K and 1 writes V; block: kPwCacheWriteThreads.
// Source rows are `token_stride` elements apart (a column slice of the fused qkv output needs no copy);
// `row_vectors` = num_kv_heads * head_dim / PwDtype<T>::kVec. Tokens with a negative slot are skipped.
template <typename T>
__global__ void __launch_bounds__(kPwCacheWriteThreads)
    write_kv_kernel(const T* __restrict__ key, const T* __restrict__ value, T* __restrict__ key_cache,
                    T* __restrict__ value_cache, const long long* __restrict__ slot_mapping,
                    long long key_token_stride, long long value_token_stride, int row_vectors) {
  const long long token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0) {
    return;
  }
  const bool is_value = blockIdx.y == 1;
  const uint4* source = reinterpret_cast<const uint4*>(
      is_value ? value + token * value_token_stride : key + token * key_token_stride);
  uint4* destination = reinterpret_cast<uint4*>(is_value ? value_cache : key_cache) + slot * row_vectors;
  for (int i = threadIdx.x; i < row_vectors; i += kPwCacheWriteThreads) {
    destination[i] = source[i];
  }
}

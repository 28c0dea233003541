// Copies whole KV blocks for lists of (src, dst) block pairs across many cache tensors in one launch:
// device -> device (copy on write) and, through mapped pinned host memory, device <-> host (swap).
// Source and destination bases are addresses the device can dereference (cache tensors of one shape).
#include "common.cuh"

constexpr int kPwBlockCopyThreads = 256;
constexpr int kPwBlockCopyUnroll = 4;

// Grid: (num_pairs, num_caches); block: kPwBlockCopyThreads. Copies `block_words` Words of block
// src_block_ids[p] of cache c (at src_bases[c]) to block dst_block_ids[p] of dst_bases[c]. A launch must
// not read a block that it also writes: the wrapper stages such copies through a scratch buffer.
template <typename Word>
__global__ void __launch_bounds__(kPwBlockCopyThreads)
    copy_blocks_kernel(const unsigned long long* __restrict__ src_bases,
                       const unsigned long long* __restrict__ dst_bases,
                       const long long* __restrict__ src_block_ids, const long long* __restrict__ dst_block_ids,
                       int block_words) {
  const int pair = blockIdx.x;
  const int cache = blockIdx.y;
  const Word* source = reinterpret_cast<const Word*>(src_bases[cache]) + src_block_ids[pair] * block_words;
  Word* destination = reinterpret_cast<Word*>(dst_bases[cache]) + dst_block_ids[pair] * block_words;
  constexpr int kStride = kPwBlockCopyThreads * kPwBlockCopyUnroll;
  int start = threadIdx.x;
  // Several independent loads in flight per thread before the first store.
  for (; start + (kPwBlockCopyUnroll - 1) * kPwBlockCopyThreads < block_words; start += kStride) {
    Word words[kPwBlockCopyUnroll];
#pragma unroll
    for (int u = 0; u < kPwBlockCopyUnroll; ++u) {
      words[u] = source[start + u * kPwBlockCopyThreads];
    }
#pragma unroll
    for (int u = 0; u < kPwBlockCopyUnroll; ++u) {
      destination[start + u * kPwBlockCopyThreads] = words[u];
    }
  }
  for (int i = start; i < block_words; i += kPwBlockCopyThreads) {
    destination[i] = source[i];
  }
}

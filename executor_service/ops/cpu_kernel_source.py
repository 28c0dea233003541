"""C++ source of the CPU paged-attention kernel (built by `cpu_kernel_build`).

One task per (query token, kv head) reads that token's visible context straight from the paged cache
through the block table (no gather) and computes, for each of the kv head's query heads:
scores by a 16-lane dot product in a fixed order, the row maximum, `exp(s - max)` summed key by key
in position order, and the value sum accumulated key by key in position order. Nothing depends on
the other tokens of the batch, on how many queries the sequence computes this step, or on the
thread count, so each row's result is bitwise the same however the batch was composed
(batch invariance). float32 only. With AVX2 a kv head's query heads go two at a time, each K and V
row loaded once for both, each row's operations in the same order as alone (`scores_pair_avx2`,
`weighted_sum_pair_avx2`): the pairing changes the loads, never the bits.
"""

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kLanes = 16;

inline float dot(const float* __restrict a, const float* __restrict b, int n) {
  float lanes[kLanes] = {0.f};
  int d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  }
  for (int l = 0; d < n; ++d, ++l) lanes[l] += a[d] * b[d];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// exp(x) for x <= 0 (scores minus their row maximum): Cephes' range reduction and degree-6
// polynomial, about 2 ulp, branch-free so the compiler vectorises loops over it.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float row_softmax(float* __restrict row, int n) {
  float row_max = -INFINITY;
  for (int p = 0; p < n; ++p) row_max = row[p] > row_max ? row[p] : row_max;
  for (int p = 0; p < n; ++p) row[p] = exp_nonpositive(row[p] - row_max);
  float lanes[kLanes] = {0.f};
  int p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += row[p + l];
  }
  for (int l = 0; p < n; ++p, ++l) lanes[l] += row[p];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}


#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
constexpr bool kHaveAvx2 = true;

// Sum of each of 8 vectors' lanes, returned as lane j = sum(v[j]); the same add tree for every j.
inline __m256 transpose_sum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a = [k0 k1 k2 k3 | k0' k1' k2' k3'] halves of keys 0-3; b likewise for keys 4-7.
  const __m256 lo = _mm256_permute2f128_ps(a, b, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(a, b, 0x31);
  return _mm256_add_ps(lo, hi);
}

// scores[p] = scale * q . k_p for p < n; keys in groups of 8 (a short last group repeats key 0
// and drops the extra lanes), so every key's dot has the same order of operations.
inline void scores_avx2(const float* q, const float* k_base, const int64_t* off, int n, int head_dim,
                        float scale, float* scores) {
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int p0 = 0; p0 < n; p0 += 8) {
    const float* keys[8];
    for (int j = 0; j < 8; ++j) keys[j] = k_base + off[p0 + j < n ? p0 + j : 0];
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < head_dim; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[j] + d), acc[j]);
    }
    const __m256 sums = _mm256_mul_ps(transpose_sum8(acc), vscale);
    if (p0 + 8 <= n) {
      _mm256_storeu_ps(scores + p0, sums);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, sums);
      for (int j = 0; p0 + j < n; ++j) scores[p0 + j] = tmp[j];
    }
  }
}

inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// Softmax of row[0:n] in place; row has room for n rounded up to 8. Lane p % 8 sums element p.
inline void softmax_avx2(float* row, int n) {
  const int padded = (n + 7) / 8 * 8;
  for (int p = n; p < padded; ++p) row[p] = -INFINITY;
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (int p = 0; p < padded; p += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + p));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float row_max = lanes[0];
  for (int j = 1; j < 8; ++j) row_max = lanes[j] > row_max ? lanes[j] : row_max;
  const __m256 m = _mm256_set1_ps(row_max);
  __m256 total = _mm256_setzero_ps();
  for (int p = 0; p < padded; p += 8) {
    const __m256 x = _mm256_loadu_ps(row + p);
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m256 e = _mm256_and_ps(exp_nonpositive8(_mm256_sub_ps(x, m)), keep);
    _mm256_storeu_ps(row + p, e);
    total = _mm256_add_ps(total, e);
  }
  const __m256 all[8] = {total, total, total, total, total, total, total, total};
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), transpose_sum8(all));
  for (int p = 0; p < padded; p += 8) _mm256_storeu_ps(row + p, _mm256_mul_ps(_mm256_loadu_ps(row + p), inv));
}

// dst[0:head_dim] = sum_p w[p] * v_p, keys in position order, 8 elements per register.
inline void weighted_sum_avx2(const float* w, const float* v_base, const int64_t* off, int n, int head_dim,
                              float* dst) {
  for (int d0 = 0; d0 < head_dim; d0 += 32) {
    const int width = head_dim - d0 < 32 ? head_dim - d0 : 32;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int p = 0; p < n; ++p) {
      const __m256 wp = _mm256_set1_ps(w[p]);
      const float* v = v_base + off[p] + d0;
      for (int c = 0; c < width / 8; ++c) acc[c] = _mm256_fmadd_ps(wp, _mm256_loadu_ps(v + 8 * c), acc[c]);
    }
    for (int c = 0; c < width / 8; ++c) _mm256_storeu_ps(dst + d0 + 8 * c, acc[c]);
  }
}

// The four keys' lane sums of v[0..3], with transpose_sum8's add tree: bitwise its lanes 0-3.
inline __m128 transpose_sum4(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
}

// scores_avx2 for two query heads of one token at once (the same keys): each key is loaded once for
// both, four keys at a time; every score comes out bitwise as scores_avx2 computes it.
inline void scores_pair_avx2(const float* q0, const float* q1, const float* k_base, const int64_t* off, int n,
                             int head_dim, float scale, float* scores0, float* scores1) {
  const __m128 vscale = _mm_set1_ps(scale);
  for (int p0 = 0; p0 < n; p0 += 4) {
    const float* keys[4];
    for (int j = 0; j < 4; ++j) keys[j] = k_base + off[p0 + j < n ? p0 + j : 0];
    __m256 acc0[4], acc1[4];
    for (int j = 0; j < 4; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
    for (int d = 0; d < head_dim; d += 8) {
      const __m256 qv0 = _mm256_loadu_ps(q0 + d);
      const __m256 qv1 = _mm256_loadu_ps(q1 + d);
      for (int j = 0; j < 4; ++j) {
        const __m256 kv = _mm256_loadu_ps(keys[j] + d);
        acc0[j] = _mm256_fmadd_ps(qv0, kv, acc0[j]);
        acc1[j] = _mm256_fmadd_ps(qv1, kv, acc1[j]);
      }
    }
    const __m128 sums0 = _mm_mul_ps(transpose_sum4(acc0), vscale);
    const __m128 sums1 = _mm_mul_ps(transpose_sum4(acc1), vscale);
    if (p0 + 4 <= n) {
      _mm_storeu_ps(scores0 + p0, sums0);
      _mm_storeu_ps(scores1 + p0, sums1);
    } else {
      alignas(16) float tmp0[4], tmp1[4];
      _mm_store_ps(tmp0, sums0);
      _mm_store_ps(tmp1, sums1);
      for (int j = 0; p0 + j < n; ++j) {
        scores0[p0 + j] = tmp0[j];
        scores1[p0 + j] = tmp1[j];
      }
    }
  }
}

// weighted_sum_avx2 for two query heads at once: each value row is loaded once for both; per output
// element the same keys in the same order, so bitwise what weighted_sum_avx2 computes.
inline void weighted_sum_pair_avx2(const float* w0, const float* w1, const float* v_base, const int64_t* off,
                                   int n, int head_dim, float* dst0, float* dst1) {
  for (int d0 = 0; d0 < head_dim; d0 += 32) {
    const int width = head_dim - d0 < 32 ? head_dim - d0 : 32;
    __m256 acc0[4], acc1[4];
    for (int c = 0; c < 4; ++c) acc0[c] = acc1[c] = _mm256_setzero_ps();
    for (int p = 0; p < n; ++p) {
      const __m256 wp0 = _mm256_set1_ps(w0[p]);
      const __m256 wp1 = _mm256_set1_ps(w1[p]);
      const float* v = v_base + off[p] + d0;
      for (int c = 0; c < width / 8; ++c) {
        const __m256 vv = _mm256_loadu_ps(v + 8 * c);
        acc0[c] = _mm256_fmadd_ps(wp0, vv, acc0[c]);
        acc1[c] = _mm256_fmadd_ps(wp1, vv, acc1[c]);
      }
    }
    for (int c = 0; c < width / 8; ++c) {
      _mm256_storeu_ps(dst0 + d0 + 8 * c, acc0[c]);
      _mm256_storeu_ps(dst1 + d0 + 8 * c, acc1[c]);
    }
  }
}
#else
constexpr bool kHaveAvx2 = false;
inline void scores_avx2(const float*, const float*, const int64_t*, int, int, float, float*) {}
inline void softmax_avx2(float*, int) {}
inline void weighted_sum_avx2(const float*, const float*, const int64_t*, int, int, float*) {}
inline void scores_pair_avx2(const float*, const float*, const float*, const int64_t*, int, int, float, float*,
                             float*) {}
inline void weighted_sum_pair_avx2(const float*, const float*, const float*, const int64_t*, int, int, float*,
                                   float*) {}
#endif

}  // namespace

torch::Tensor paged_attention(
    torch::Tensor query,          // [T, H, D] float32
    torch::Tensor key_cache,      // [NB, BS, KVH, D] float32
    torch::Tensor value_cache,    // [NB, BS, KVH, D] float32
    torch::Tensor block_tables,   // [S, MB] int32
    torch::Tensor context_lens,   // [S] int32
    torch::Tensor query_start_loc,// [S + 1] int32
    double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32, "query must be float32");
  TORCH_CHECK(key_cache.scalar_type() == torch::kFloat32 && value_cache.scalar_type() == torch::kFloat32,
              "KV cache must be float32");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "query and KV cache must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32 &&
              query_start_loc.scalar_type() == torch::kInt32, "metadata tensors must be int32");
  auto tables = block_tables.contiguous();
  const int64_t num_tokens = query.size(0);
  const int num_heads = query.size(1);
  const int head_dim = query.size(2);
  const int block_size = key_cache.size(1);
  const int num_kv_heads = key_cache.size(2);
  const int group = num_heads / num_kv_heads;
  const int num_seqs = context_lens.size(0);
  const int max_blocks = tables.size(1);
  auto out = torch::empty_like(query);

  const float* q = query.data_ptr<float>();
  const float* kc = key_cache.data_ptr<float>();
  const float* vc = value_cache.data_ptr<float>();
  const int32_t* bt = tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  const int32_t* qs = query_start_loc.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t slot_stride = static_cast<int64_t>(num_kv_heads) * head_dim;

  // Token -> sequence map, so tasks can be split over (token, kv head) pairs, and the cache offset of
  // every context position of every sequence (computed once, read by all of the sequence's tasks).
  std::vector<int32_t> seq_of_token(num_tokens);
  std::vector<int64_t> seq_base(num_seqs + 1, 0);
  for (int s = 0; s < num_seqs; ++s) {
    for (int t = qs[s]; t < qs[s + 1]; ++t) seq_of_token[t] = s;
    seq_base[s + 1] = seq_base[s] + cl[s];
  }
  std::vector<int64_t> offsets(seq_base[num_seqs]);
  for (int s = 0; s < num_seqs; ++s) {
    const int32_t* table = bt + static_cast<int64_t>(s) * max_blocks;
    int64_t* dst = offsets.data() + seq_base[s];
    for (int p = 0; p < cl[s]; ++p) {
      dst[p] = (static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size) * slot_stride;
    }
  }

  const bool use_avx2 = kHaveAvx2 && head_dim % 8 == 0;
  at::parallel_for(0, num_tokens * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / num_kv_heads;
      const int kvh = task % num_kv_heads;
      const int s = seq_of_token[t];
      const int query_len = qs[s + 1] - qs[s];
      const int visible = cl[s] - query_len + static_cast<int>(t - qs[s]) + 1;
      const int64_t* off = offsets.data() + seq_base[s];
      const float* k_base = kc + static_cast<int64_t>(kvh) * head_dim;
      const float* v_base = vc + static_cast<int64_t>(kvh) * head_dim;
      if (use_avx2) {
        // Query heads two at a time share each K and V load; a last odd head goes alone. Both paths
        // give a row the same bits, so the pairing never shows in the output.
        const int stride = (visible + 7) / 8 * 8;
        scores.resize(static_cast<size_t>(2 * stride));
        float* row0 = scores.data();
        float* row1 = scores.data() + stride;
        int g = 0;
        for (; g + 2 <= group; g += 2) {
          const int64_t head = t * num_heads + kvh * group + g;
          scores_pair_avx2(q + head * head_dim, q + (head + 1) * head_dim, k_base, off, visible, head_dim, fscale,
                           row0, row1);
          softmax_avx2(row0, visible);
          softmax_avx2(row1, visible);
          weighted_sum_pair_avx2(row0, row1, v_base, off, visible, head_dim, o + head * head_dim,
                                 o + (head + 1) * head_dim);
        }
        if (g < group) {
          const int64_t head = t * num_heads + kvh * group + g;
          scores_avx2(q + head * head_dim, k_base, off, visible, head_dim, fscale, row0);
          softmax_avx2(row0, visible);
          weighted_sum_avx2(row0, v_base, off, visible, head_dim, o + head * head_dim);
        }
        continue;
      }
      scores.resize(static_cast<size_t>(group) * visible);
      for (int p = 0; p < visible; ++p) {
        const float* k = k_base + off[p];
        for (int g = 0; g < group; ++g) {
          const float* qh = q + (t * num_heads + kvh * group + g) * head_dim;
          scores[static_cast<size_t>(g) * visible + p] = dot(qh, k, head_dim) * fscale;
        }
      }
      for (int g = 0; g < group; ++g) {
        float* row = scores.data() + static_cast<size_t>(g) * visible;
        const float inv_total = 1.f / row_softmax(row, visible);
        for (int p = 0; p < visible; ++p) row[p] *= inv_total;
        float* dst = o + (t * num_heads + kvh * group + g) * head_dim;
        // Each output element sums its keys in position order; 16 elements at a time in registers.
        int d0 = 0;
        for (; d0 + kLanes <= head_dim; d0 += kLanes) {
          float acc[kLanes] = {0.f};
          for (int p = 0; p < visible; ++p) {
            const float w = row[p];
            const float* v = v_base + off[p] + d0;
            for (int l = 0; l < kLanes; ++l) acc[l] += w * v[l];
          }
          for (int l = 0; l < kLanes; ++l) dst[d0 + l] = acc[l];
        }
        for (; d0 < head_dim; ++d0) {
          float acc = 0.f;
          for (int p = 0; p < visible; ++p) acc += row[p] * v_base[off[p] + d0];
          dst[d0] = acc;
        }
      }
    }
  });
  return out;
}
"""

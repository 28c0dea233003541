"""C++ source of the CPU SGMV shrink and expand kernels (built by `cpu_sgmv`).

One call per op covers the whole mixed batch: the rows with an adapter are ordered by slot and cut
into tasks of a few rows of one slot, so each slot's A (shrink) or B (expand) is streamed from memory
once per call and read in place from the stacked slot tensors (no gather, no copy), however the
scheduler interleaved the adapters. Every row computes its own dot products in a fixed order (AVX2:
4 ranks of shrink or 8 outputs of expand per pass; otherwise 16 lanes), so a row's result depends
only on its own input and slot: bitwise the same whatever else is in the batch and however many
threads run (batch invariance, like the attention kernel). Rows of slot -1 or outside every segment
cost a zero fill in shrink and nothing in expand. float32 only.
"""

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <vector>

namespace {

constexpr int kLanes = 16;
constexpr int64_t kMinTaskMacs = 1 << 20;

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float lanes[kLanes] = {0.f};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  }
  for (int l = 0; d < n; ++d, ++l) lanes[l] += a[d] * b[d];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// Rows with an adapter, ordered by slot (stable), cut into tasks of at most kRowsPerTask rows of one
// slot: a slot's weights are read from memory once per step however its rows are spread over the
// batch, and stay in cache for the task's later rows. Order never changes a row's arithmetic.
constexpr int64_t kRowsPerTask = 16;

struct RowTasks {
  std::vector<int32_t> slot_of_row;  // -1: no segment, or a segment without adapter
  std::vector<int64_t> rows;         // rows with slot >= 0, by slot
  std::vector<int64_t> task_starts;  // task i covers rows[task_starts[i] .. task_starts[i + 1])
};

RowTasks row_tasks(const torch::Tensor& starts, const torch::Tensor& slot_ids, int64_t num_rows, int64_t num_slots) {
  RowTasks tasks;
  tasks.slot_of_row.assign(static_cast<size_t>(num_rows), -1);
  const int32_t* st = starts.data_ptr<int32_t>();
  const int32_t* sl = slot_ids.data_ptr<int32_t>();
  const int64_t num_segments = slot_ids.numel();
  std::vector<int64_t> count(static_cast<size_t>(num_slots) + 1, 0);
  for (int64_t i = 0; i < num_segments; ++i) {
    if (sl[i] < 0) continue;
    for (int64_t t = st[i]; t < st[i + 1]; ++t) tasks.slot_of_row[t] = sl[i];
    count[sl[i] + 1] += st[i + 1] - st[i];
  }
  for (int64_t s = 0; s < num_slots; ++s) count[s + 1] += count[s];
  tasks.rows.resize(static_cast<size_t>(count[num_slots]));
  std::vector<int64_t> next(count.begin(), count.end() - 1);
  for (int64_t t = 0; t < num_rows; ++t) {
    const int32_t slot = tasks.slot_of_row[t];
    if (slot >= 0) tasks.rows[next[slot]++] = t;
  }
  for (int64_t s = 0; s < num_slots; ++s) {
    for (int64_t i = count[s]; i < count[s + 1]; i += kRowsPerTask) tasks.task_starts.push_back(i);
  }
  tasks.task_starts.push_back(count[num_slots]);
  return tasks;
}

// Tasks per parallel chunk, so that a chunk does at least kMinTaskMacs multiply-adds: a decode batch
// of a few dozen rows runs on the calling thread instead of paying for a parallel region per call.
int64_t grain(const RowTasks& tasks, int64_t macs_per_row) {
  const int64_t num_tasks = static_cast<int64_t>(tasks.task_starts.size()) - 1;
  const int64_t macs = static_cast<int64_t>(tasks.rows.size()) * macs_per_row;
  const int64_t per_task = num_tasks > 0 ? macs / num_tasks : 1;
  const int64_t g = kMinTaskMacs / (per_task > 0 ? per_task : 1);
  return g > 1 ? g : 1;
}

// One row of shrink: dst[j] = scale * x . a_j for the `rank` rows a_j of `a` (each `n` long).
inline void shrink_row_generic(const float* x, const float* a, int64_t rank, int64_t n, float scale, float* dst) {
  for (int64_t j = 0; j < rank; ++j) dst[j] = dot(x, a + j * n, n) * scale;
}

// One row of expand: dst[o] += v . b_o for the `out_features` rows b_o of `b` (each `rank` long).
inline void expand_row_generic(const float* v, const float* b, int64_t rank, int64_t out_features, float* dst) {
  for (int64_t o = 0; o < out_features; ++o) dst[o] += dot(v, b + o * rank, rank);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
constexpr bool kHaveAvx2 = true;

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Lane j of the result is the sum of v[j]'s lanes; the same add tree for every j.
inline __m256 transpose_sum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Four ranks at a time share each load of x; n % 16 == 0 and rank % 4 == 0.
inline void shrink_row_avx2(const float* x, const float* a, int64_t rank, int64_t n, float scale, float* dst) {
  for (int64_t j0 = 0; j0 < rank; j0 += 4) {
    const float* r0 = a + j0 * n;
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + d), x1 = _mm256_loadu_ps(x + d + 8);
      for (int k = 0; k < 4; ++k) {
        const float* r = r0 + k * n + d;
        acc[2 * k] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(r), acc[2 * k]);
        acc[2 * k + 1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(r + 8), acc[2 * k + 1]);
      }
    }
    for (int k = 0; k < 4; ++k) dst[j0 + k] = hsum8(_mm256_add_ps(acc[2 * k], acc[2 * k + 1])) * scale;
  }
}

// Eight outputs at a time, one accumulator each, reduced together; rank % 8 == 0.
inline void expand_row_avx2(const float* v, const float* b, int64_t rank, int64_t out_features, float* dst) {
  int64_t o0 = 0;
  for (; o0 + 8 <= out_features; o0 += 8) {
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t r = 0; r < rank; r += 8) {
      const __m256 vv = _mm256_loadu_ps(v + r);
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(vv, _mm256_loadu_ps(b + (o0 + k) * rank + r), acc[k]);
    }
    _mm256_storeu_ps(dst + o0, _mm256_add_ps(_mm256_loadu_ps(dst + o0), transpose_sum8(acc)));
  }
  for (; o0 < out_features; ++o0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t r = 0; r < rank; r += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(v + r), _mm256_loadu_ps(b + o0 * rank + r), acc);
    dst[o0] += hsum8(acc);
  }
}
#else
constexpr bool kHaveAvx2 = false;
inline void shrink_row_avx2(const float*, const float*, int64_t, int64_t, float, float*) {}
inline void expand_row_avx2(const float*, const float*, int64_t, int64_t, float*) {}
#endif

}  // namespace

// out[t] = scale * x[t] @ lora_a[s].T for rows t of slot s >= 0; every other row of out = 0.
void sgmv_shrink(torch::Tensor x, torch::Tensor lora_a, torch::Tensor out, torch::Tensor starts,
                 torch::Tensor slot_ids, double scale) {
  const int64_t num_rows = x.size(0), in_features = x.size(1), rank = lora_a.size(1);
  const int64_t x_stride = x.stride(0), out_stride = out.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* ap = lora_a.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const RowTasks tasks = row_tasks(starts, slot_ids, num_rows, lora_a.size(0));
  for (int64_t t = 0; t < num_rows; ++t) {
    if (tasks.slot_of_row[t] < 0) {
      for (int64_t j = 0; j < rank; ++j) op[t * out_stride + j] = 0.f;
    }
  }
  const bool use_avx2 = kHaveAvx2 && in_features % 16 == 0 && rank % 4 == 0;
  const int64_t num_tasks = static_cast<int64_t>(tasks.task_starts.size()) - 1;
  at::parallel_for(0, num_tasks, grain(tasks, rank * in_features), [&](int64_t begin, int64_t end) {
    for (int64_t i = tasks.task_starts[begin]; i < tasks.task_starts[end]; ++i) {
      const int64_t t = tasks.rows[i];
      const float* a = ap + static_cast<int64_t>(tasks.slot_of_row[t]) * rank * in_features;
      if (use_avx2) {
        shrink_row_avx2(xp + t * x_stride, a, rank, in_features, fscale, op + t * out_stride);
      } else {
        shrink_row_generic(xp + t * x_stride, a, rank, in_features, fscale, op + t * out_stride);
      }
    }
  });
}

// out[t] += v[t] @ lora_b[s].T for rows t of slot s >= 0 (one float32 add per element); other rows
// untouched. out's rows may be strided (a column slice of a fused projection).
void sgmv_expand(torch::Tensor v, torch::Tensor lora_b, torch::Tensor out, torch::Tensor starts,
                 torch::Tensor slot_ids) {
  const int64_t num_rows = v.size(0), rank = v.size(1), out_features = lora_b.size(1);
  const int64_t v_stride = v.stride(0), out_stride = out.stride(0);
  const float* vp = v.data_ptr<float>();
  const float* bp = lora_b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const RowTasks tasks = row_tasks(starts, slot_ids, num_rows, lora_b.size(0));
  const bool use_avx2 = kHaveAvx2 && rank % 8 == 0;
  const int64_t num_tasks = static_cast<int64_t>(tasks.task_starts.size()) - 1;
  at::parallel_for(0, num_tasks, grain(tasks, rank * out_features), [&](int64_t begin, int64_t end) {
    for (int64_t i = tasks.task_starts[begin]; i < tasks.task_starts[end]; ++i) {
      const int64_t t = tasks.rows[i];
      const float* b = bp + static_cast<int64_t>(tasks.slot_of_row[t]) * out_features * rank;
      if (use_avx2) {
        expand_row_avx2(vp + t * v_stride, b, rank, out_features, op + t * out_stride);
      } else {
        expand_row_generic(vp + t * v_stride, b, rank, out_features, op + t * out_stride);
      }
    }
  });
}
"""

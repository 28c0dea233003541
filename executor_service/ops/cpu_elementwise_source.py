"""C++ source of the CPU RMSNorm and rotary-embedding kernels (built by `cpu_kernel_build`, in one module with the attention kernel).

Both work row by row, each row read once and written once, where the torch reference makes a pass per
elementwise op (RMSNorm: six; rotary: a gather of cos and sin, four products, two sums and a
concatenation, for the query and for the key). A row's result depends on that row alone, computed in
a fixed order (RMSNorm's sum of squares over 8 lanes, then a fixed add tree), so it is bitwise the
same whatever the batch, the chunking or the thread count. float32 only.
"""

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>

namespace {

constexpr int kNormLanes = 8;
constexpr int64_t kRowsPerTask = 16;

}  // namespace

// out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps), for x [T, H] float32 with unit stride in H.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32,
              "rms_norm takes float32");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm takes [T, H] rows with unit stride");
  TORCH_CHECK(weight.is_contiguous() && weight.size(0) == x.size(1), "weight must be [H], contiguous");
  const int64_t num_rows = x.size(0);
  const int hidden = x.size(1);
  const int64_t row_stride = x.stride(0);
  auto out = torch::empty({num_rows, hidden}, x.options());
  const float* src = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, num_rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = src + t * row_stride;
      float lanes[kNormLanes] = {0.f};
      int d = 0;
      for (; d + kNormLanes <= hidden; d += kNormLanes) {
        for (int l = 0; l < kNormLanes; ++l) lanes[l] += row[d + l] * row[d + l];
      }
      for (int l = 0; d < hidden; ++d, ++l) lanes[l] += row[d] * row[d];
      for (int width = kNormLanes / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      }
      const float inv_rms = 1.f / std::sqrt(lanes[0] / static_cast<float>(hidden) + feps);
      float* o = dst + t * hidden;
      for (int e = 0; e < hidden; ++e) o[e] = w[e] * (row[e] * inv_rms);
    }
  });
  return out;
}

// Rotates query [T, H, D] and key [T, KVH, D] in place, rotate-half layout, by cos/sin [P, D/2] at
// positions [T] (int64). Rows may have any stride (views into the fused qkv projection); heads and
// elements must be dense.
void rotary_embedding(torch::Tensor positions, torch::Tensor query, torch::Tensor key,
                      torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32 && key.scalar_type() == torch::kFloat32 &&
              cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32,
              "rotary_embedding takes float32");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous(), "positions: int64");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "cos and sin must be contiguous");
  const int64_t num_tokens = query.size(0);
  const int head_dim = query.size(2);
  const int half = head_dim / 2;
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == head_dim && key.stride(2) == 1 &&
              key.stride(1) == head_dim && key.size(2) == head_dim && cos.size(1) == half,
              "query and key need dense heads of head_dim, cos and sin [P, head_dim / 2]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t num_positions = cos.size(0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < num_positions, "position out of the rotary table");
  }
  struct Part { float* base; int64_t row_stride; int num_heads; };
  const Part parts[2] = {{query.data_ptr<float>(), query.stride(0), static_cast<int>(query.size(1))},
                         {key.data_ptr<float>(), key.stride(0), static_cast<int>(key.size(1))}};
  const float* cos_table = cos.data_ptr<float>();
  const float* sin_table = sin.data_ptr<float>();
  at::parallel_for(0, num_tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos_table + pos[t] * half;
      const float* s = sin_table + pos[t] * half;
      for (const Part& part : parts) {
        for (int h = 0; h < part.num_heads; ++h) {
          float* first = part.base + t * part.row_stride + static_cast<int64_t>(h) * head_dim;
          float* second = first + half;
          for (int e = 0; e < half; ++e) {
            const float a = first[e];
            const float b = second[e];
            first[e] = a * c[e] - b * s[e];
            second[e] = b * c[e] + a * s[e];
          }
        }
      }
    }
  });
}
"""

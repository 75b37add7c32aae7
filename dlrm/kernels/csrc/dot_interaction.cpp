// Kernels of fast_numerics.py: DLRM's dot interaction, forward and backward, in float32.
//
// Dimension vocabulary: B batch, F features (the bottom-MLP output and the T pooled embeddings),
// D embedding dim, P pairs.
//
// torch's bmm hands each sample's F x D by D x F product to a GEMM call of its own; at DLRM's
// sizes (F = 9..27, D = 16..64) that costs microseconds of call overhead per sample for a few
// hundred multiply-adds. Here one thread walks a range of samples and keeps each sample's features
// in L1: forward, the P dot products <v_i, v_j> written straight into the output after the dense
// vector (no concatenation); backward, with S = G + G^T (G: the pair gradients d loss / d <v_i, v_j>
// placed at (i, j); so twice g_p on the diagonal), d v_i = sum_j S_ij v_j, plus the pass-through
// gradient of the dense vector, each 8 values of d v_i accumulated in a register and written once.
// With AVX2/FMA (the build adds -mavx2 -mfma where torch reports that capability) sums over D run in
// 8 lanes of fused multiply-adds; they round differently from bmm's GEMM: float32-level
// differences, not bit-identical.
//
// Features are given as F tensors (B, D) whose rows may be strided (stride(1) == 1).
// Only the headers needed (not <torch/extension.h>), which keeps the build short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGrain = 32;  // samples per parallel task

struct Features {
  std::vector<const float*> base;
  std::vector<int64_t> row_stride;
  int64_t batch = 0, dim = 0;

  explicit Features(const std::vector<at::Tensor>& features) {
    TORCH_CHECK(!features.empty(), "dot interaction: no features");
    batch = features[0].size(0);
    dim = features[0].size(1);
    for (const auto& f : features) {
      TORCH_CHECK(f.device().is_cpu() && f.scalar_type() == at::kFloat && f.dim() == 2,
                  "dot interaction: features must be 2-D float32 CPU tensors");
      TORCH_CHECK(f.size(0) == batch && f.size(1) == dim && f.stride(1) == 1,
                  "dot interaction: every feature must be (B, D) with unit stride along D");
      base.push_back(f.data_ptr<float>());
      row_stride.push_back(f.stride(0));
    }
  }
  const float* row(int64_t f, int64_t b) const { return base[f] + b * row_stride[f]; }
};

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// <a, b> over D values: 8 lanes of partial sums, then the tail.
inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t dim) {
  int64_t d = 0;
  float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  s = hsum(acc);
#endif
  for (; d < dim; ++d) s += a[d] * b[d];
  return s;
}

// out[0:D] = init[0:D] (or 0) + sum_j s[j] * v_j[0:D]; 8 values at a time kept in a register.
inline void combine(float* __restrict__ out, const float* __restrict__ init, const float* __restrict__ s,
                    const float* const* __restrict__ v, int64_t num, int64_t dim) {
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; d + 8 <= dim; d += 8) {
    __m256 acc = init ? _mm256_loadu_ps(init + d) : _mm256_setzero_ps();
    for (int64_t j = 0; j < num; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(v[j] + d), acc);
    _mm256_storeu_ps(out + d, acc);
  }
#endif
  for (; d < dim; ++d) {
    float acc = init ? init[d] : 0.0f;
    for (int64_t j = 0; j < num; ++j) acc += s[j] * v[j][d];
    out[d] = acc;
  }
}

void check_pairs(const at::Tensor& rows, const at::Tensor& cols, int64_t num_features) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong && rows.is_contiguous() &&
                  cols.is_contiguous() && rows.numel() == cols.numel(),
              "dot interaction: rows and cols must be contiguous int64 tensors of one length");
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  for (int64_t p = 0; p < rows.numel(); ++p) {
    TORCH_CHECK(r[p] >= 0 && r[p] < num_features && c[p] >= 0 && c[p] < num_features,
                "dot interaction: pair index out of range");
  }
}

// (B, D + P): the dense vector (feature 0), then <v_rows[p], v_cols[p]> for every pair p.
at::Tensor dot_forward(const std::vector<at::Tensor>& features, const at::Tensor& rows, const at::Tensor& cols) {
  const Features in(features);
  check_pairs(rows, cols, static_cast<int64_t>(features.size()));
  const int64_t pairs = rows.numel(), dim = in.dim, width = dim + pairs;
  at::Tensor out = at::empty({in.batch, width}, features[0].options());
  float* o = out.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  at::parallel_for(0, in.batch, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* ob = o + b * width;
      const float* dense = in.row(0, b);
      for (int64_t d = 0; d < dim; ++d) ob[d] = dense[d];
      for (int64_t p = 0; p < pairs; ++p) ob[dim + p] = dot(in.row(r[p], b), in.row(c[p], b), dim);
    }
  });
  return out;
}

// The F gradients (B, D), given d loss / d output (B, D + P).
std::vector<at::Tensor> dot_backward(const at::Tensor& grad_out, const std::vector<at::Tensor>& features,
                                     const at::Tensor& rows, const at::Tensor& cols) {
  const Features in(features);
  const int64_t num = static_cast<int64_t>(features.size()), pairs = rows.numel(), dim = in.dim;
  check_pairs(rows, cols, num);
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.dim() == 2 && grad_out.size(0) == in.batch &&
                  grad_out.size(1) == dim + pairs && grad_out.stride(1) == 1,
              "dot interaction: grad_out must be (B, D + P) float32 with unit stride along its rows");
  std::vector<at::Tensor> grads;
  std::vector<float*> gp;
  for (int64_t f = 0; f < num; ++f) {
    grads.push_back(at::empty({in.batch, dim}, features[0].options()));
    gp.push_back(grads.back().data_ptr<float>());
  }
  const float* g = grad_out.data_ptr<float>();
  const int64_t g_stride = grad_out.stride(0);
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  at::parallel_for(0, in.batch, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> sym(num * num);  // S = G + G^T of one sample
    std::vector<const float*> v(num);
    for (int64_t b = begin; b < end; ++b) {
      const float* gb = g + b * g_stride;
      std::fill(sym.begin(), sym.end(), 0.0f);
      for (int64_t p = 0; p < pairs; ++p) {
        sym[r[p] * num + c[p]] += gb[dim + p];
        sym[c[p] * num + r[p]] += gb[dim + p];
      }
      for (int64_t f = 0; f < num; ++f) v[f] = in.row(f, b);
      for (int64_t f = 0; f < num; ++f) {
        combine(gp[f] + b * dim, f == 0 ? gb : nullptr, sym.data() + f * num, v.data(), num, dim);
      }
    }
  });
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dot_forward", &dot_forward, "DLRM dot interaction: (B, D + P) from F features (B, D)");
  m.def("dot_backward", &dot_backward, "gradients of the F features from d loss / d output");
}

// y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]) for few rows m, fp32: the decode-time linear layer.
//
// With one to a few query rows a linear layer is bound by streaming the weight from DRAM, and
// MKL's sgemv/small-m sgemm reach about half of this machine's read bandwidth (12 of ~26 GB/s
// on the 2-core dev box). Here every weight row is read exactly once, in tiles of 4 rows kept in
// L1 while up to 3 query rows at a time are run against them (12 accumulators + 4 weight
// registers fit AVX2's 16). The n rows are split into one contiguous range per thread, so each
// thread streams its own part of the weight sequentially, which the hardware prefetcher follows.
//
// Summation order differs from MKL's, so results agree to float rounding, not bit for bit.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPRUCE_GEMM_AVX2 1
#endif

namespace {

constexpr int kRowsPerTile = 4;   // weight rows
constexpr int kQueryGroup = 3;    // query rows per pass over a tile

#ifdef SPRUCE_GEMM_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [r0, r0 + 4) of w against query rows [i0, i0 + MB); k % 8 == 0.
template <int MB>
inline void tile4(const float* x, int64_t ldx, const float* w, int64_t k, float* y, int64_t ldy,
                  int64_t r0) {
  __m256 acc[MB][kRowsPerTile];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm256_setzero_ps();
  const float* w0 = w + r0 * k;
  for (int64_t c = 0; c < k; c += 8) {
    __m256 wv[kRowsPerTile];
    for (int r = 0; r < kRowsPerTile; ++r) wv[r] = _mm256_loadu_ps(w0 + r * k + c);
    for (int i = 0; i < MB; ++i) {
      __m256 xv = _mm256_loadu_ps(x + i * ldx + c);
      for (int r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm256_fmadd_ps(wv[r], xv, acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) y[i * ldy + r0 + r] = hsum(acc[i][r]);
}
#endif

inline float dot_scalar(const float* a, const float* b, int64_t k) {
  float s = 0.f;
  for (int64_t c = 0; c < k; ++c) s += a[c] * b[c];
  return s;
}

// Output columns [n0, n1) for every query row.
void gemm_range(const float* x, int64_t m, int64_t ldx, const float* w, int64_t k, float* y,
                int64_t ldy, int64_t n0, int64_t n1, bool vector_ok) {
  int64_t r = n0;
#ifdef SPRUCE_GEMM_AVX2
  if (vector_ok) {
    for (; r + kRowsPerTile <= n1; r += kRowsPerTile) {
      int64_t i = 0;
      for (; i + kQueryGroup <= m; i += kQueryGroup)
        tile4<kQueryGroup>(x + i * ldx, ldx, w, k, y + i * ldy, ldy, r);
      if (m - i == 2) tile4<2>(x + i * ldx, ldx, w, k, y + i * ldy, ldy, r);
      if (m - i == 1) tile4<1>(x + i * ldx, ldx, w, k, y + i * ldy, ldy, r);
    }
  }
#endif
  for (; r < n1; ++r)
    for (int64_t i = 0; i < m; ++i) y[i * ldy + r] = dot_scalar(x + i * ldx, w + r * k, k);
}

}  // namespace

// out[m, n] = x[m, k] @ w[n, k]^T (+ bias). fp32 CPU tensors; x rows and w contiguous in k.
void skinny_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                   const c10::optional<at::Tensor>& bias, bool force_scalar) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && out.device().is_cpu(),
              "skinny_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "skinny_linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "skinny_linear: 2-D tensors");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k, "skinny_linear: x has ", k, " columns, w has ", w.size(1));
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "skinny_linear: out must be [", m, ", ", n, "]");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous() && out.stride(1) == 1,
              "skinny_linear: x, w and out need unit stride along their last dim");
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = out.stride(0);
  const bool vector_ok = !force_scalar && (k % 8) == 0;
  int nt = 1;
#ifdef _OPENMP
  // Below ~256 KiB of weight the fork/join costs more than a second thread saves.
  if (n * k >= (1 << 16)) nt = std::max(1, at::get_num_threads());
#endif
  if (nt == 1) {
    gemm_range(xp, m, ldx, wp, k, yp, ldy, 0, n, vector_ok);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      // Contiguous, tile-aligned ranges: one sequential weight stream per thread.
      const int64_t tiles = (n + kRowsPerTile - 1) / kRowsPerTile;
      const int64_t a = std::min(n, tiles * t / T * kRowsPerTile);
      const int64_t b = std::min(n, tiles * (t + 1) / T * kRowsPerTile);
      gemm_range(xp, m, ldx, wp, k, yp, ldy, a, b, vector_ok);
    }
#endif
  }
  if (bias.has_value() && bias->defined()) out.add_(bias->view({1, n}));
}

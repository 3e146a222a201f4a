// y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]) for few rows m, fp32: the decode-time linear layer.
//
// With one to a few query rows a linear layer is bound by streaming the weight from DRAM, and
// MKL's sgemv/small-m sgemm reach about half of this machine's read bandwidth (12 of ~26 GB/s
// on the 2-core dev box). Here every weight row is read exactly once, in tiles of 4 rows kept in
// L1 while up to 3 query rows at a time are run against them (12 accumulators + 4 weight
// registers fit AVX2's 16). The n rows are split into one contiguous range per thread, so each
// thread streams its own part of the weight sequentially, which the hardware prefetcher follows.
//
// Where the build has AVX-512 (and k is a multiple of 16), 16-lane tiles of 4 weight rows run
// against up to 6 query rows at a time (24 accumulators of AVX-512's 32 registers): on the 2-core
// Ice Lake VM a SmolLM2 forward of 5 rows took 1.83x one row with the AVX2 tiles, which made a
// speculative verify step cost as much as the tokens it brought. Which path runs depends on k
// only, never on m, so a row's result does not depend on how many rows share the call -- what
// keeps greedy speculation token-identical to plain decoding.
//
// Summation order differs from MKL's, so results agree to float rounding, not bit for bit.
#include <torch/extension.h>

#include "row_split.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPRUCE_GEMM_AVX2 1
#if defined(__AVX512F__)
#define SPRUCE_GEMM_AVX512 1
#endif
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

// A 4-row weight tile (row-major, k apart; output columns [r0, r0 + 4)) against query rows
// [0, MB); k % 8 == 0.
template <int MB>
inline void tile4(const float* x, int64_t ldx, const float* w0, int64_t k, float* y, int64_t ldy,
                  int64_t r0) {
  __m256 acc[MB][kRowsPerTile];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm256_setzero_ps();
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

#ifdef SPRUCE_GEMM_AVX512
constexpr int kQueryGroup512 = 6;

inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// tile4 in 16 lanes; k % 16 == 0.
template <int MB>
inline void tile4_512(const float* x, int64_t ldx, const float* w0, int64_t k, float* y, int64_t ldy,
                      int64_t r0) {
  __m512 acc[MB][kRowsPerTile];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 16) {
    __m512 wv[kRowsPerTile];
    for (int r = 0; r < kRowsPerTile; ++r) wv[r] = _mm512_loadu_ps(w0 + r * k + c);
    for (int i = 0; i < MB; ++i) {
      __m512 xv = _mm512_loadu_ps(x + i * ldx + c);
      for (int r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) y[i * ldy + r0 + r] = hsum512(acc[i][r]);
}

inline void run_tile512(const float* x, int64_t m, int64_t ldx, const float* w_tile, int64_t k, float* y,
                        int64_t ldy, int64_t r0) {
  int64_t i = 0;
  for (; i + kQueryGroup512 <= m; i += kQueryGroup512)
    tile4_512<kQueryGroup512>(x + i * ldx, ldx, w_tile, k, y + i * ldy, ldy, r0);
  const float* xi = x + i * ldx;
  float* yi = y + i * ldy;
  switch (m - i) {
    case 5: tile4_512<5>(xi, ldx, w_tile, k, yi, ldy, r0); break;
    case 4: tile4_512<4>(xi, ldx, w_tile, k, yi, ldy, r0); break;
    case 3: tile4_512<3>(xi, ldx, w_tile, k, yi, ldy, r0); break;
    case 2: tile4_512<2>(xi, ldx, w_tile, k, yi, ldy, r0); break;
    case 1: tile4_512<1>(xi, ldx, w_tile, k, yi, ldy, r0); break;
    default: break;
  }
}
#endif

inline bool use_512(int64_t k) {
#ifdef SPRUCE_GEMM_AVX512
  return k % 16 == 0;
#else
  (void)k;
  return false;
#endif
}

inline float dot_scalar(const float* a, const float* b, int64_t k) {
  float s = 0.f;
  for (int64_t c = 0; c < k; ++c) s += a[c] * b[c];
  return s;
}

// Every query row against one 4-row tile.
inline void run_tile(const float* x, int64_t m, int64_t ldx, const float* w_tile, int64_t k, float* y,
                     int64_t ldy, int64_t r0) {
#ifdef SPRUCE_GEMM_AVX2
  int64_t i = 0;
  for (; i + kQueryGroup <= m; i += kQueryGroup)
    tile4<kQueryGroup>(x + i * ldx, ldx, w_tile, k, y + i * ldy, ldy, r0);
  if (m - i == 2) tile4<2>(x + i * ldx, ldx, w_tile, k, y + i * ldy, ldy, r0);
  if (m - i == 1) tile4<1>(x + i * ldx, ldx, w_tile, k, y + i * ldy, ldy, r0);
#endif
}

// Output columns [n0, n1) for every query row.
void gemm_range(const float* x, int64_t m, int64_t ldx, const float* w, int64_t k, float* y,
                int64_t ldy, int64_t n0, int64_t n1, bool vector_ok) {
  int64_t r = n0;
#ifdef SPRUCE_GEMM_AVX512
  if (vector_ok && use_512(k))
    for (; r + kRowsPerTile <= n1; r += kRowsPerTile) run_tile512(x, m, ldx, w + r * k, k, y, ldy, r);
#endif
#ifdef SPRUCE_GEMM_AVX2
  if (vector_ok)
    for (; r + kRowsPerTile <= n1; r += kRowsPerTile) run_tile(x, m, ldx, w + r * k, k, y, ldy, r);
#endif
  for (; r < n1; ++r)
    for (int64_t i = 0; i < m; ++i) y[i * ldy + r] = dot_scalar(x + i * ldx, w + r * k, k);
}

// ---- block-quantized weights (GGUF Q4_1 / Q8_0, blocks of 32 along k) ----------------------
//
// A linear whose weight came from a quantized GGUF reads the blocks (4.5-6 bits a weight instead
// of 32) and dequantizes one 4-row tile at a time into an L1 scratch, which then runs through
// the same tile code as fp32. Every dequantized value is d*q (+ m) rounded once -- d*q is exact
// in fp32 (11-bit d times a 4- or 8-bit q) -- which is exactly what the loader's dequantization
// stored in the fp32 weight, so the result is bit-identical to skinny_linear on that weight.

constexpr int64_t kQBlock = 32;
enum QuantFormat { kQ4_1 = 0, kQ8_0 = 1 };

struct QuantWeight {
  int format;
  const uint8_t* qs;    // Q4_1: [n, k/2] (per block: low nibbles = 0..15, high = 16..31); Q8_0: int8 [n, k]
  const float* scale;   // [n, k/32]
  const float* minv;    // Q4_1: [n, k/32]; Q8_0: unused
  int64_t k;
};

void dequant_row_scalar(const QuantWeight& q, int64_t row, float* dst) {
  const int64_t nb = q.k / kQBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const float d = q.scale[row * nb + b];
    float* o = dst + b * kQBlock;
    if (q.format == kQ4_1) {
      const uint8_t* p = q.qs + row * (q.k / 2) + b * 16;
      const float mn = q.minv[row * nb + b];
      for (int j = 0; j < 16; ++j) {
        o[j] = std::fma(d, float(p[j] & 0x0F), mn);
        o[j + 16] = std::fma(d, float(p[j] >> 4), mn);
      }
    } else {
      const int8_t* p = reinterpret_cast<const int8_t*>(q.qs) + row * q.k + b * kQBlock;
      for (int j = 0; j < kQBlock; ++j) o[j] = d * float(p[j]);
    }
  }
}

#ifdef SPRUCE_GEMM_AVX2
// Block b of weight row `row`, dequantized into w[0..3] (weights 8j .. 8j+7 in w[j]).
inline void dequant_block_avx2(const QuantWeight& q, int64_t row, int64_t b, __m256 w[4]) {
  const int64_t nb = q.k / kQBlock;
  const __m256 d = _mm256_set1_ps(q.scale[row * nb + b]);
  if (q.format == kQ4_1) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256 mn = _mm256_set1_ps(q.minv[row * nb + b]);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q.qs + row * (q.k / 2) + b * 16));
    const __m128i lo = _mm_and_si128(bytes, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int j = 0; j < 4; ++j) w[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), mn);
  } else {
    const int8_t* p = reinterpret_cast<const int8_t*>(q.qs) + row * q.k + b * kQBlock;
    for (int j = 0; j < 4; ++j) {
      const __m128i v8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j));
      w[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v8)));
    }
  }
}

#ifdef SPRUCE_GEMM_AVX512
// Block b of weight row `row` into w[0..1] (weights 16j .. 16j+15 in w[j]); the same values as
// dequant_block_avx2 (one fma / mul each).
inline void dequant_block_avx512(const QuantWeight& q, int64_t row, int64_t b, __m512 w[2]) {
  const int64_t nb = q.k / kQBlock;
  const __m512 d = _mm512_set1_ps(q.scale[row * nb + b]);
  if (q.format == kQ4_1) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m512 mn = _mm512_set1_ps(q.minv[row * nb + b]);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q.qs + row * (q.k / 2) + b * 16));
    const __m128i lo = _mm_and_si128(bytes, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    w[0] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), mn);
    w[1] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), mn);
  } else {
    const int8_t* p = reinterpret_cast<const int8_t*>(q.qs) + row * q.k + b * kQBlock;
    for (int j = 0; j < 2; ++j) {
      const __m128i v8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j));
      w[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v8)));
    }
  }
}

void dequant_row_avx512(const QuantWeight& q, int64_t row, float* dst) {
  __m512 w[2];
  for (int64_t b = 0; b < q.k / kQBlock; ++b) {
    dequant_block_avx512(q, row, b, w);
    for (int j = 0; j < 2; ++j) _mm512_storeu_ps(dst + b * kQBlock + 16 * j, w[j]);
  }
}

// Up to 6 query rows with the tile dequantized in registers (once per tile: one query group);
// accumulates exactly as tile4_512, so bit-identical to the scratch path and to skinny_linear.
template <int MB>
void tile4_fused512(const float* x, int64_t ldx, const QuantWeight& q, int64_t r0, float* y, int64_t ldy) {
  __m512 acc[MB][kRowsPerTile];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm512_setzero_ps();
  __m512 w[2];
  for (int64_t b = 0; b < q.k / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    for (int r = 0; r < kRowsPerTile; ++r) {
      dequant_block_avx512(q, r0 + r, b, w);
      for (int j = 0; j < 2; ++j)
        for (int i = 0; i < MB; ++i)
          acc[i][r] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(xb + i * ldx + 16 * j), acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) y[i * ldy + r0 + r] = hsum512(acc[i][r]);
}

void fused512(int64_t m, const float* x, int64_t ldx, const QuantWeight& q, int64_t r, float* y, int64_t ldy) {
  switch (m) {
    case 6: tile4_fused512<6>(x, ldx, q, r, y, ldy); break;
    case 5: tile4_fused512<5>(x, ldx, q, r, y, ldy); break;
    case 4: tile4_fused512<4>(x, ldx, q, r, y, ldy); break;
    case 3: tile4_fused512<3>(x, ldx, q, r, y, ldy); break;
    case 2: tile4_fused512<2>(x, ldx, q, r, y, ldy); break;
    default: tile4_fused512<1>(x, ldx, q, r, y, ldy); break;
  }
}
#endif

void dequant_row_avx2(const QuantWeight& q, int64_t row, float* dst) {
  __m256 w[4];
  for (int64_t b = 0; b < q.k / kQBlock; ++b) {
    dequant_block_avx2(q, row, b, w);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + b * kQBlock + 8 * j, w[j]);
  }
}

// One or two query rows: dequantize in registers, straight into the FMAs, with no scratch round
// trip (at 1 row the dequantization, not memory, is the bound). Each output still accumulates
// fma(w, x, acc) over k in ascending 8-lane steps and ends in the same hsum as tile4, so the
// result is bit-identical to the scratch path and to skinny_linear.
template <int MB>
void tile4_fused(const float* x, int64_t ldx, const QuantWeight& q, int64_t r0, float* y, int64_t ldy) {
  __m256 acc[MB][kRowsPerTile];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) acc[i][r] = _mm256_setzero_ps();
  __m256 w[4];
  for (int64_t b = 0; b < q.k / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    for (int r = 0; r < kRowsPerTile; ++r) {
      dequant_block_avx2(q, r0 + r, b, w);
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < MB; ++i)
          acc[i][r] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xb + i * ldx + 8 * j), acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < kRowsPerTile; ++r) y[i * ldy + r0 + r] = hsum(acc[i][r]);
}
#endif

// `scratch` is sized on first use: the in-register path (1-2 rows) needs none.
void quant_gemm_range(const float* x, int64_t m, int64_t ldx, const QuantWeight& q, float* y, int64_t ldy,
                      int64_t n0, int64_t n1, bool vector_ok, std::vector<float>& buf) {
  const int64_t k = q.k;
  auto scratch_for = [&]() {
    if (buf.empty()) buf.resize(kRowsPerTile * k);
    return buf.data();
  };
  int64_t r = n0;
#ifdef SPRUCE_GEMM_AVX512
  if (vector_ok && use_512(k)) {
    if (m <= kQueryGroup512)
      for (; r + kRowsPerTile <= n1; r += kRowsPerTile) fused512(m, x, ldx, q, r, y, ldy);
    for (; r + kRowsPerTile <= n1; r += kRowsPerTile) {
      float* scratch = scratch_for();
      for (int t = 0; t < kRowsPerTile; ++t) dequant_row_avx512(q, r + t, scratch + t * k);
      run_tile512(x, m, ldx, scratch, k, y, ldy, r);
    }
  }
#endif
#ifdef SPRUCE_GEMM_AVX2
  if (vector_ok && m <= 2) {
    for (; r + kRowsPerTile <= n1; r += kRowsPerTile) {
      if (m == 2)
        tile4_fused<2>(x, ldx, q, r, y, ldy);
      else
        tile4_fused<1>(x, ldx, q, r, y, ldy);
    }
  }
  if (vector_ok) {
    for (; r + kRowsPerTile <= n1; r += kRowsPerTile) {
      float* scratch = scratch_for();
      for (int t = 0; t < kRowsPerTile; ++t) dequant_row_avx2(q, r + t, scratch + t * k);
      run_tile(x, m, ldx, scratch, k, y, ldy, r);
    }
  }
#endif
  for (; r < n1; ++r) {
    float* scratch = scratch_for();
    dequant_row_scalar(q, r, scratch);
    for (int64_t i = 0; i < m; ++i) y[i * ldy + r] = dot_scalar(x + i * ldx, scratch, k);
  }
}

void check_xy(const at::Tensor& out, const at::Tensor& x, int64_t n, int64_t k, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, op, ": float32 only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2, op, ": 2-D tensors");
  TORCH_CHECK(x.size(1) == k, op, ": x has ", x.size(1), " columns, the weight has ", k);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == n, op, ": out must be [", x.size(0), ", ", n, "]");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, op, ": x and out need unit stride along their last dim");
}

}  // namespace

// out[m, n] = x[m, k] @ w[n, k]^T (+ bias). fp32 CPU tensors; x rows and w contiguous in k.
void skinny_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                   const c10::optional<at::Tensor>& bias, bool force_scalar) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2,
              "skinny_linear: w must be a 2-D float32 CPU tensor");
  const int64_t m = x.size(0), k = w.size(1), n = w.size(0);
  check_xy(out, x, n, k, "skinny_linear");
  TORCH_CHECK(w.is_contiguous(), "skinny_linear: w must be contiguous");
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = out.stride(0);
  const bool vector_ok = !force_scalar && (k % 8) == 0;
  spruce::for_each_row_range(n, kRowsPerTile, spruce::gemm_threads(n, k), [&](int64_t a, int64_t b) {
    gemm_range(xp, m, ldx, wp, k, yp, ldy, a, b, vector_ok);
  });
  if (bias.has_value() && bias->defined()) out.add_(bias->view({1, n}));
}

// out[m, n] = x[m, k] @ dequant(w)[n, k]^T (+ bias) for a block-quantized w (see QuantWeight).
void quant_linear(at::Tensor out, const at::Tensor& x, int64_t format, const at::Tensor& qs,
                  const at::Tensor& scale, const c10::optional<at::Tensor>& minv,
                  const c10::optional<at::Tensor>& bias, bool force_scalar) {
  const auto nk = spruce::check_quant_blocks("quant_linear", format, qs, scale, minv);
  const int64_t n = nk.first, k = nk.second;
  const bool has_min = minv.has_value() && minv->defined();
  const int64_t m = x.size(0);
  check_xy(out, x, n, k, "quant_linear");
  QuantWeight q{int(format), reinterpret_cast<const uint8_t*>(qs.data_ptr()), scale.data_ptr<float>(),
                has_min ? minv->data_ptr<float>() : nullptr, k};
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = out.stride(0);
  spruce::for_each_row_range(n, kRowsPerTile, spruce::gemm_threads(n, k), [&](int64_t a, int64_t b) {
    std::vector<float> scratch;
    quant_gemm_range(xp, m, ldx, q, yp, ldy, a, b, !force_scalar, scratch);
  });
  if (bias.has_value() && bias->defined()) out.add_(bias->view({1, n}));
}

// y[m, n] = x[m, k] @ dequant(w)[n, k]^T (+ bias[n]) in bf16, for a GGUF block-quantized w
// (Q4_1 / Q8_0, blocks of 32 along k) and few rows m: decode steps and speculative verification.
//
// A bf16 model's weight is bf16(d*q (+ m)); the loader stored exactly that. Here each 4-row tile
// of blocks is dequantized once into an L1 scratch as those same bf16 values (d*q + m is exact in
// fp32, then one round-to-nearest-even, as torch's cast does) and every query row runs against it
// with AVX-512 BF16 dot products (bf16 products exact in fp32, fp32 sums), one rounding to bf16 at
// the end. So the weight is read as its 4.5-8.5-bit blocks, dequantized once whatever m is, and
// an output row depends only on its own input row: the same bits at 1 row and at 16, which keeps
// a speculative step's verification equal to plain decoding.
#include "quant_bf16.h"
#include "row_split.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SPRUCE_QBF16 1
#endif

namespace {

constexpr int64_t kBlock = 32;     // weights per quantization block (GGUF)
constexpr int kTileRows = 4;       // weight rows dequantized together
constexpr int kGroup = 4;          // query rows per pass over a tile: 16 accumulators

#ifdef SPRUCE_QBF16
struct Blocks {
  int format;                 // 0 Q4_1, 1 Q8_0
  const uint8_t* qs;          // Q4_1 [n, k/2] (block: low nibbles weights 0..15, high 16..31); Q8_0 int8 [n, k]
  const float* scale;         // [n, k/32]
  const float* minv;          // Q4_1 [n, k/32]
  int64_t k;
};

// Block b of weight row `row` as 32 bf16 values, weight j in lane j.
inline __m512bh dequant_block(const Blocks& q, int64_t row, int64_t b) {
  const int64_t nb = q.k / kBlock;
  const __m512 d = _mm512_set1_ps(q.scale[row * nb + b]);
  __m512 lo, hi;
  if (q.format == 0) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q.qs + row * (q.k / 2) + b * 16));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m512 mn = _mm512_set1_ps(q.minv[row * nb + b]);
    lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4))), mn);
    hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                _mm_and_si128(_mm_srli_epi16(bytes, 4), low4))), mn);
  } else {
    const int8_t* p = reinterpret_cast<const int8_t*>(q.qs) + row * q.k + b * kBlock;
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))));
  }
  return _mm512_cvtne2ps_pbh(hi, lo);   // lanes 0..15 from lo, 16..31 from hi
}

// G query rows (bf16, ldx apart) against a dequantized tile (kTileRows rows of k bf16).
template <int G>
void run_group(const uint16_t* x, int64_t ldx, const uint16_t* tile, int64_t k, int rows, float* acc_out) {
  __m512 acc[G][kTileRows];
  for (int i = 0; i < G; ++i)
    for (int t = 0; t < kTileRows; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += kBlock) {
    __m512bh w[kTileRows];
    for (int t = 0; t < kTileRows; ++t) w[t] = (__m512bh)_mm512_loadu_si512(tile + t * k + c);
    for (int i = 0; i < G; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * ldx + c);
      for (int t = 0; t < kTileRows; ++t) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], xv, w[t]);
    }
  }
  for (int i = 0; i < G; ++i)
    for (int t = 0; t < rows; ++t) acc_out[i * kTileRows + t] = _mm512_reduce_add_ps(acc[i][t]);
}

void gemm_range(const uint16_t* x, int64_t m, int64_t ldx, const Blocks& q, const float* bias,
                c10::BFloat16* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t k = q.k, nb = k / kBlock;
  std::vector<uint16_t> tile(kTileRows * k, 0);   // rows past n1 stay zero
  float sums[kGroup * kTileRows];
  for (int64_t r = n0; r < n1; r += kTileRows) {
    const int rows = int(std::min<int64_t>(kTileRows, n1 - r));
    for (int t = 0; t < rows; ++t)
      for (int64_t b = 0; b < nb; ++b)
        _mm512_storeu_si512(tile.data() + t * k + b * kBlock, (__m512i)dequant_block(q, r + t, b));
    for (int64_t i0 = 0; i0 < m; i0 += kGroup) {
      const int g = int(std::min<int64_t>(kGroup, m - i0));
      const uint16_t* xi = x + i0 * ldx;
      switch (g) {
        case 4: run_group<4>(xi, ldx, tile.data(), k, rows, sums); break;
        case 3: run_group<3>(xi, ldx, tile.data(), k, rows, sums); break;
        case 2: run_group<2>(xi, ldx, tile.data(), k, rows, sums); break;
        default: run_group<1>(xi, ldx, tile.data(), k, rows, sums); break;
      }
      for (int i = 0; i < g; ++i)
        for (int t = 0; t < rows; ++t)
          y[(i0 + i) * ldy + r + t] = c10::BFloat16(sums[i * kTileRows + t] + (bias ? bias[r + t] : 0.f));
    }
  }
}
#endif  // SPRUCE_QBF16

}  // namespace

bool quant_bf16_available() {
#ifdef SPRUCE_QBF16
  return true;
#else
  return false;
#endif
}

void quant_linear_bf16(at::Tensor out, const at::Tensor& x, int64_t format, const at::Tensor& qs,
                       const at::Tensor& scale, const c10::optional<at::Tensor>& minv,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(quant_bf16_available(), "quant_linear_bf16: this build has no AVX-512 BF16 (check quant_bf16_available())");
  const auto nk = spruce::check_quant_blocks("quant_linear_bf16", format, qs, scale, minv);
  const int64_t n = nk.first, k = nk.second;
  const bool has_min = minv.has_value() && minv->defined();
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && x.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16 && x.dim() == 2 && out.dim() == 2,
              "quant_linear_bf16: x and out must be 2-D bfloat16 CPU tensors");
  const int64_t m = x.size(0);
  TORCH_CHECK(x.size(1) == k, "quant_linear_bf16: x has ", x.size(1), " columns, the weight has ", k);
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "quant_linear_bf16: out must be [", m, ", ", n, "]");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "quant_linear_bf16: x and out need unit inner stride");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "quant_linear_bf16: bias must be a contiguous float32 tensor of ", n, " elements");
#ifdef SPRUCE_QBF16
  Blocks q{int(format), reinterpret_cast<const uint8_t*>(qs.data_ptr()), scale.data_ptr<float>(),
           has_min ? minv->data_ptr<float>() : nullptr, k};
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>());
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  const int64_t ldx = x.stride(0), ldy = out.stride(0);
  spruce::for_each_row_range(n, kTileRows, spruce::gemm_threads(n, k), [&](int64_t a, int64_t b) {
    gemm_range(xp, m, ldx, q, bp, yp, ldy, a, b);
  });
#endif
}

// y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]) in bf16 on Intel AMX, for decode-sized m (up to a few
// hundred rows): the linear layers of a bf16 model's decode steps.
//
// At these sizes a layer is bound by streaming its weight from DRAM, yet oneDNN's AMX GEMM runs
// SmolLM2's 576-wide layers at ~450 GFLOP/s at 64 rows -- about a third of the bandwidth bound --
// plus ~30 us of per-call set-up in torch. Here the weight is packed once into AMX's B-tile layout
// in the order it is read: per 16 output columns, the k blocks of 32 one after the other (1 KiB
// each), so each thread streams one contiguous range of the packed weight. A step of the inner
// loop multiplies two 16-row tiles of x by two 16-column tiles of w into four 16x16 fp32
// accumulators (8 tile registers: 4 C, 2 A, 2 B); the next column block's tiles are prefetched
// meanwhile. Every output element sums its k blocks in the same order whatever m is, so a row's
// result does not depend on the other rows of the batch.
//
// Rounding: bf16 products are exact in fp32, sums in fp32 (AMX's order), one round to bf16 at the
// end (round to nearest even), with the bias added in fp32 first -- as oneDNN does.
#include "amx_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SPRUCE_AMX 1
#endif

namespace {

constexpr int64_t kTileK = 32;   // bf16 values of k per tile row (64 bytes)
constexpr int64_t kTileN = 16;   // output columns per B tile
constexpr int64_t kTileM = 16;   // rows per A / C tile
constexpr int64_t kTileElems = kTileK * kTileN;   // 512 bf16 = 1 KiB

#ifdef SPRUCE_AMX
// Linux hands out AMX's tile state only to processes that ask (arch_prctl, kernel >= 5.16).
bool request_amx() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// One 16x16 fp32 accumulator tile -> rows [0, nrows) of out (bf16, row stride ldo), + bias.
inline void store_tile(const float* c, c10::BFloat16* out, int64_t ldo, int64_t nrows,
                       const float* bias) {
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int64_t r = 0; r < nrows; ++r) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(c + r * kTileN), b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo), (__m256i)v);
  }
}

// Output columns [n0, n0 + 16 * nt) (nt = 1 or 2) for all row tiles; x has mt row tiles (padded).
void column_block(const c10::BFloat16* x, int64_t ldx, int64_t mt, int64_t m, const uint16_t* wp,
                  int64_t kb, int64_t n0, int nt, const c10::BFloat16* prefetch_next,
                  c10::BFloat16* out, int64_t ldo, const float* bias) {
  alignas(64) float c[4][kTileM * kTileN];
  const uint16_t* b0 = wp + (n0 / kTileN) * kb * kTileElems;
  const uint16_t* b1 = b0 + kb * kTileElems;
  const int64_t xstride = ldx * 2;
  for (int64_t mp = 0; mp < mt; mp += 2) {
    const bool two_m = mp + 1 < mt;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const c10::BFloat16* a0 = x + mp * kTileM * ldx;
    const c10::BFloat16* a1 = a0 + kTileM * ldx;
    for (int64_t k = 0; k < kb; ++k) {
      if (mp == 0 && prefetch_next) {
        // The next column block's tiles for this k (2 KiB), a whole block ahead of their use.
        const char* p = reinterpret_cast<const char*>(prefetch_next) + k * 2 * kTileElems * 2;
        for (int i = 0; i < 2 * kTileElems * 2; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
      }
      _tile_loadd(4, a0 + k * kTileK, xstride);
      _tile_loadd(6, b0 + k * kTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (nt == 2) {
        _tile_loadd(7, b1 + k * kTileElems, 64);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (two_m) {
        _tile_loadd(5, a1 + k * kTileK, xstride);
        _tile_dpbf16ps(2, 5, 6);
        if (nt == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c[0], 64);
    if (nt == 2) _tile_stored(1, c[1], 64);
    if (two_m) {
      _tile_stored(2, c[2], 64);
      if (nt == 2) _tile_stored(3, c[3], 64);
    }
    for (int64_t mi = 0; mi < (two_m ? 2 : 1); ++mi) {
      const int64_t r0 = (mp + mi) * kTileM;
      const int64_t nrows = std::min(kTileM, m - r0);
      if (nrows <= 0) continue;
      for (int j = 0; j < nt; ++j)
        store_tile(c[mi * 2 + j], out + r0 * ldo + n0 + j * kTileN, ldo, nrows,
                   bias ? bias + n0 + j * kTileN : nullptr);
    }
  }
}
#endif  // SPRUCE_AMX

}  // namespace

bool amx_available() {
#ifdef SPRUCE_AMX
  static const bool ok = request_amx();
  return ok;
#else
  return false;
#endif
}

at::Tensor amx_pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kBFloat16,
              "amx_pack_weight: w must be a 2-D bfloat16 CPU tensor");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(n % kTileN == 0 && k % kTileK == 0, "amx_pack_weight: w is [", n, ", ", k,
              "]; needs rows % 16 == 0 and columns % 32 == 0");
  const at::Tensor wc = w.contiguous();
  // [n/16][k/32][16 k-pairs][16 columns][2]: tile (nb, kb) row p holds w[nb*16 + c][kb*32 + 2p + e]
  // at column c, element e -- the VNNI pairs a B tile of tdpbf16ps takes.
  at::Tensor packed = at::empty({n * k}, w.options());
  const auto* src = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  const int64_t kb = k / kTileK;
  at::parallel_for(0, n / kTileN, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t kk = 0; kk < kb; ++kk) {
        uint16_t* t = dst + (nb * kb + kk) * kTileElems;
        for (int64_t p = 0; p < kTileK / 2; ++p)
          for (int64_t c = 0; c < kTileN; ++c)
            for (int64_t e = 0; e < 2; ++e)
              t[(p * kTileN + c) * 2 + e] = src[(nb * kTileN + c) * k + kk * kTileK + 2 * p + e];
      }
  });
  return packed;
}

void amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed, int64_t n,
                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_available(), "amx_linear: this build or CPU has no AMX (check amx_available())");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16 &&
                  x.stride(1) == 1, "amx_linear: x must be a 2-D bfloat16 CPU tensor, unit inner stride");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kTileK == 0 && n % kTileN == 0 && packed.numel() == n * k &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "amx_linear: packed must be amx_pack_weight of an [", n, ", ", k, "] weight");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.dim() == 2 && out.size(0) == m &&
                  out.size(1) == n && out.stride(1) == 1, "amx_linear: out must be bfloat16 [", m,
              ", ", n, "] with unit inner stride");
  std::vector<float> bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "amx_linear: bias must have ", n, " elements");
    const at::Tensor bf = bias->to(at::kFloat).contiguous();
    bias_f.assign(bf.data_ptr<float>(), bf.data_ptr<float>() + n);
  }
  if (m == 0) return;
#ifdef SPRUCE_AMX
  const int64_t mt = (m + kTileM - 1) / kTileM;
  // Tiles always load 16 rows: a ragged last row tile reads from a zero-padded copy of x.
  at::Tensor xp = x;
  if (m % kTileM != 0) {
    xp = at::zeros({mt * kTileM, k}, x.options());
    xp.narrow(0, 0, m).copy_(x);
  }
  const auto* xd = reinterpret_cast<const c10::BFloat16*>(xp.data_ptr());
  const int64_t ldx = xp.stride(0), ldo = out.stride(0), kb = k / kTileK;
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* od = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
  const float* bp = bias_f.empty() ? nullptr : bias_f.data();
  const int64_t blocks = (n / kTileN + 1) / 2;   // column blocks of 32 (the last may be 16)
  // One contiguous range of column blocks per thread: each streams its own part of the weight.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, blocks, (blocks + nthreads - 1) / nthreads, [&](int64_t b0, int64_t b1) {
    configure_tiles();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * 2 * kTileN;
      const int nt = n0 + kTileN < n ? 2 : 1;
      const auto* next = blk + 1 < b1
          ? reinterpret_cast<const c10::BFloat16*>(wp + ((n0 + 2 * kTileN) / kTileN) * kb * kTileElems)
          : nullptr;
      column_block(xd, ldx, mt, m, wp, kb, n0, nt, next, od, ldo, bp);
    }
    _tile_release();
  });
#endif
}

// Paged attention for CPU: reads K/V in place from the block-paged cache.
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim], fp32, bf16 or fp16.
// Token t of request b lives in block block_tables[b, t / block_size] at offset t % block_size.
//
// Work is split into items of (request, KV heads, query tile, context partition). An item's rows
// are every query head of its KV heads for each query token of the tile, so each K/V row loaded
// serves at least G = H / Hkv rows. A decode item takes all KV heads of its request: each context
// token's K (and V) is then one contiguous run of Hkv * head_dim values. Per item: scores for the
// whole range into a thread-local buffer, softmax, then P @ V -- K is streamed once and V once,
// and no accumulator rescaling as in an online softmax. When there are too few items to keep
// every thread busy (one long request), the context is also split into partitions whose partial
// results are merged by their log-sum-exp (flash-decoding).
//
// Kernels: AVX-512 for the score and P @ V passes where the build has it (head_dim % 16 == 0),
// AVX2 otherwise, and portable loops for any head_dim.
//
// Threads come from OpenMP with at::get_num_threads(): the extension links the same libgomp that
// torch has already loaded, so torch.set_num_threads governs this op too.
#include <torch/extension.h>

#include "amx_gemm.h"
#include "fused_ops.h"
#include "quant_bf16.h"
#include "skinny_gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPRUCE_PA_AVX2 1
#if defined(__AVX512F__)
#define SPRUCE_PA_AVX512 1
#endif
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Tests flip this to cover the portable path on machines that have AVX2.
bool g_force_scalar = false;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

struct Geometry {
  int64_t block_size, hkv, d, g;
  int64_t tok_stride;    // elements between consecutive tokens of one block: hkv * d
  int64_t block_stride;  // elements between blocks: block_size * hkv * d
  const int64_t* tables;
  int64_t table_stride;
};

struct Item {
  int64_t b;
  int64_t h0, nh;     // KV heads [h0, h0 + nh)
  int64_t q0, nq;     // query tokens [q0, q0 + nq) of the request (0 = its first query token)
  int64_t t0, t1;     // context tokens [t0, t1) this item covers
  int64_t slot;       // partial-result slot when the context is partitioned, else -1
  int64_t cost;
};

struct Group {  // the partitions of one (request, heads, query tile), merged after the fact
  int64_t b, h0, nh, q0, nq, slot0, nparts;
};

// Row r of an item (head-major: KV head, then query token, then query head of the group) ->
// (query token within the tile, query head).
inline void row_coords(int64_t r, int64_t nq, int64_t g, int64_t h0, int64_t* j, int64_t* h) {
  const int64_t rph = nq * g, hl = r / rph, rr = r % rph;
  *j = rr / g;
  *h = (h0 + hl) * g + rr % g;
}

// Speculative token trees: the query tokens of a tree request see the whole committed context but,
// among the query tokens themselves, only their ancestors (and themselves). row[r] is row r's
// visibility over the request's query tokens (null: plain causal), start[r] the item-relative
// index of the request's first query token (negative when the item starts after it).
struct RowMasks {
  std::vector<const uint8_t*> row;
  std::vector<int64_t> start;
  bool any = false;
  // Entries of s[0, nr) at tokens row r must not see become `value` (-inf before the softmax).
  void fill(int64_t r, float* s, int64_t nr, float value) const {
    if (!any || row[r] == nullptr) return;
    for (int64_t i = std::max<int64_t>(start[r], 0); i < nr; ++i)
      if (!row[r][i - start[r]]) s[i] = value;
  }
  bool masked(int64_t r, int64_t i) const {
    return any && row[r] != nullptr && i >= start[r] && !row[r][i - start[r]];
  }
};

// Per-thread scratch, grown on demand and kept for the whole call.
struct Scratch {
  std::vector<float> q, scores, acc, m, l;
  std::vector<int64_t> offs, lim;
  RowMasks masks;
};

// ---------------------------------------------------------------------------------------------
// Row loads/stores in any of the supported dtypes (per row, not in the hot loops).

void load_row(const void* base, at::ScalarType st, int64_t n, float scale, float* dst) {
  switch (st) {
    case at::kFloat: {
      auto p = static_cast<const float*>(base);
      for (int64_t i = 0; i < n; ++i) dst[i] = p[i] * scale;
      break;
    }
    case at::kBFloat16: {
      auto p = static_cast<const c10::BFloat16*>(base);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]) * scale;
      break;
    }
    case at::kHalf: {
      auto p = static_cast<const c10::Half*>(base);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]) * scale;
      break;
    }
    default:
      break;
  }
}

void store_row(void* base, at::ScalarType st, int64_t n, const float* src, float mul) {
  switch (st) {
    case at::kFloat: {
      auto p = static_cast<float*>(base);
      for (int64_t i = 0; i < n; ++i) p[i] = src[i] * mul;
      break;
    }
    case at::kBFloat16: {
      auto p = static_cast<c10::BFloat16*>(base);
      for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(src[i] * mul);
      break;
    }
    case at::kHalf: {
      auto p = static_cast<c10::Half*>(base);
      for (int64_t i = 0; i < n; ++i) p[i] = c10::Half(src[i] * mul);
      break;
    }
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 kernels.

#ifdef SPRUCE_PA_AVX2

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen and shift, exact.
  __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
#ifdef __F16C__
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#else
inline __m256 load8(const c10::Half* p) {
  alignas(32) float t[8];
  for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(t);
}
#endif

inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Lane i of the result = horizontal sum of a[i]: eight dot products finished at once, which costs
// about one instruction per dot instead of the five of a lone horizontal sum.
inline __m256 reduce8(const __m256* a) {
  __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
  __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
  __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
  __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
  t0 = _mm256_hadd_ps(t0, t1);
  t2 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20), _mm256_permute2f128_ps(t0, t2, 0x31));
}

// exp for x <= 0 (scores minus their max). Cephes' polynomial after range reduction by ln 2:
// relative error ~1e-7 over the range, far inside what attention tolerates, and ~10x cheaper than
// calling expf per score.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  x = _mm256_max_ps(x, lo);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// acc[g][j] += p[g][t] * V[t][c0 + 8j .. +8] for NG rows and NR 8-lane chunks of head_dim at once:
// the accumulators stay in registers for the whole token run (NG * NR <= 12 of 16 ymm).
template <typename T, int NG, int NR>
void pv_tile(const T* v, const int64_t* offs, int64_t n, const float* p, int64_t ps, int64_t c0,
             float* acc, int64_t acc_stride) {
  __m256 a[NG][NR];
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < NR; ++j) a[g][j] = _mm256_loadu_ps(acc + g * acc_stride + c0 + 8 * j);
  for (int64_t t = 0; t < n; ++t) {
    const T* vr = v + offs[t] + c0;
    __m256 w[NG];
    for (int g = 0; g < NG; ++g) w[g] = _mm256_broadcast_ss(p + g * ps + t);
    for (int j = 0; j < NR; ++j) {
      __m256 x = load8(vr + 8 * j);
      for (int g = 0; g < NG; ++g) a[g][j] = _mm256_fmadd_ps(w[g], x, a[g][j]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < NR; ++j) _mm256_storeu_ps(acc + g * acc_stride + c0 + 8 * j, a[g][j]);
}

template <typename T, int NG>
void pv_rows(const T* v, const int64_t* offs, int64_t n, const float* p, int64_t ps, int64_t d,
             float* acc, int64_t acc_stride) {
  static_assert(NG <= 3, "NG * 4 accumulators must fit in 16 ymm registers");
  int64_t c = 0;
  for (; c + 32 <= d; c += 32) pv_tile<T, NG, 4>(v, offs, n, p, ps, c, acc, acc_stride);
  for (; c + 16 <= d; c += 16) pv_tile<T, NG, 2>(v, offs, n, p, ps, c, acc, acc_stride);
  for (; c < d; c += 8) pv_tile<T, NG, 1>(v, offs, n, p, ps, c, acc, acc_stride);
}

#ifdef SPRUCE_PA_AVX512
// AVX-512 versions of the score and P @ V passes (head_dim a multiple of 16): twice the lanes,
// and 32 registers let one K row, once widened, serve three query rows x eight tokens of
// accumulators -- the AVX2 pass widens each K chunk once per query row.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m256 fold256(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// s[g * ps + i] = q[g] . K[kr[i]] for NG rows and 8 tokens.
template <typename T, int NG>
inline void qk8_512(const T* const* kr, const float* q, int64_t d, float* s, int64_t ps) {
  __m512 a[NG][8];
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < 8; ++i) a[g][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16) {
    __m512 qv[NG];
    for (int g = 0; g < NG; ++g) qv[g] = _mm512_loadu_ps(q + g * d + c);
    for (int i = 0; i < 8; ++i) {
      const __m512 kv = load16(kr[i] + c);
      for (int g = 0; g < NG; ++g) a[g][i] = _mm512_fmadd_ps(qv[g], kv, a[g][i]);
    }
  }
  for (int g = 0; g < NG; ++g) {
    __m256 h[8];
    for (int i = 0; i < 8; ++i) h[i] = fold256(a[g][i]);
    _mm256_storeu_ps(s + g * ps, reduce8(h));
  }
}

template <typename T>
void scores_avx512(const T* kbase, const T* vbase, const int64_t* offs, int64_t n, int64_t nh,
                   int64_t rph, const float* q, const int64_t* lim, int64_t d, float* scores,
                   int64_t ps, int64_t run_bytes) {
  auto prefetch_run = [run_bytes](const T* p) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t b = 0; b < run_bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
  };
  // V of the keys being scored goes to L2 meanwhile: pass 3 then finds it there instead of
  // waiting on memory a window at a time (~7% of decode attention at 32 x 220 tokens, 2 threads).
  auto prefetch_v = [run_bytes](const T* p) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t b = 0; b < run_bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
  };
  constexpr int64_t kAhead = 16;
  for (int64_t i = 0; i < std::min(kAhead, n); ++i) prefetch_run(kbase + offs[i]);
  // Keys go 8 at a time, the last group padded with the last key (its extra scores land in the
  // row's padding, ps >= n rounded up to 8), so a key's score is the same sum whatever n is: a
  // query gets the same bits alone (decode) as in a longer query tile (speculative verify).
  for (int64_t t = 0; t < n; t += 8) {
    for (int64_t i = t + kAhead; i < std::min(n, t + kAhead + 8); ++i) prefetch_run(kbase + offs[i]);
    for (int64_t i = t; i < std::min(n, t + 8); ++i) prefetch_v(vbase + offs[i]);
    for (int64_t hl = 0; hl < nh; ++hl) {
      const T* kr[8];
      for (int i = 0; i < 8; ++i) kr[i] = kbase + offs[std::min(t + i, n - 1)] + hl * d;
      for (int64_t r = hl * rph, end = (hl + 1) * rph; r < end; r += 3) {
        const int64_t ng = std::min<int64_t>(3, end - r);
        if (lim[r + ng - 1] <= t) continue;   // lim grows along a head's rows
        float* s = scores + r * ps + t;
        if (ng == 3) qk8_512<T, 3>(kr, q + r * d, d, s, ps);
        else if (ng == 2) qk8_512<T, 2>(kr, q + r * d, d, s, ps);
        else qk8_512<T, 1>(kr, q + r * d, d, s, ps);
      }
    }
  }
}

template <typename T, int NG, int NR>
void pv_tile512(const T* v, const int64_t* offs, int64_t n, const float* p, int64_t ps, int64_t c0,
                float* acc, int64_t acc_stride) {
  __m512 a[NG][NR];
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < NR; ++j) a[g][j] = _mm512_loadu_ps(acc + g * acc_stride + c0 + 16 * j);
  for (int64_t t = 0; t < n; ++t) {
    const T* vr = v + offs[t] + c0;
    __m512 w[NG];
    for (int g = 0; g < NG; ++g) w[g] = _mm512_set1_ps(p[g * ps + t]);
    for (int j = 0; j < NR; ++j) {
      const __m512 x = load16(vr + 16 * j);
      for (int g = 0; g < NG; ++g) a[g][j] = _mm512_fmadd_ps(w[g], x, a[g][j]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(acc + g * acc_stride + c0 + 16 * j, a[g][j]);
}

template <typename T, int NG>
void pv_rows512(const T* v, const int64_t* offs, int64_t n, const float* p, int64_t ps, int64_t d,
                float* acc, int64_t acc_stride) {
  int64_t c = 0;
  for (; c + 128 <= d; c += 128) pv_tile512<T, NG, 8>(v, offs, n, p, ps, c, acc, acc_stride);
  for (; c + 64 <= d; c += 64) pv_tile512<T, NG, 4>(v, offs, n, p, ps, c, acc, acc_stride);
  for (; c + 32 <= d; c += 32) pv_tile512<T, NG, 2>(v, offs, n, p, ps, c, acc, acc_stride);
  for (; c < d; c += 16) pv_tile512<T, NG, 1>(v, offs, n, p, ps, c, acc, acc_stride);
}
#endif  // SPRUCE_PA_AVX512

// The softmax denominator, summed in fp64 and rounded once: with every term an fp32 value in
// (0, 1], the result does not depend (beyond fp64 rounding, ~1e-16 relative) on which lane a term
// falls in. A tree node's ancestors sit at other slots than the same tokens in plain decoding;
// this keeps its attention output, and so speculative greedy output, equal to decoding's.
inline float softmax_sum_fp64(const float* s, int64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm_loadu_ps(s + i)));
    a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm_loadu_ps(s + i + 4)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(a0, a1));
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) sum += s[i];
  return float(sum);
}

// One item, head_dim a multiple of 8. The item covers nh consecutive KV heads (kbase/vbase point
// at the first; the next is d elements on) and rph rows per head, rows head-major: R = nh * rph.
// q: [R, d] pre-scaled; lim[r]: tokens row r may see, counted from the item's first token (0..n),
// nondecreasing within each head's rows. Produces per-row max m, sum l and unnormalised acc [R, d].
template <typename T>
void attend_avx2(const T* kbase, const T* vbase, const int64_t* offs, int64_t n, int64_t nh,
                 int64_t rph, const float* q, const int64_t* lim, const RowMasks& masks, int64_t d,
                 float* scores, float* acc, float* m, float* l) {
  const int64_t nc = d / 8, rows = nh * rph;
  const int64_t ps = (n + 7) & ~int64_t(7);  // score row stride
  // Pass 1: scores. Row r only needs tokens below lim[r].
  // Decode is memory-bound (every K/V byte is used for just G rows) and every block_size tokens
  // the reads jump to another block, where the hardware prefetcher starts over; software
  // prefetches a tile or two ahead keep the loads fed (~10% faster, measured single-threaded).
  const int64_t run_bytes = nh * d * (int64_t)sizeof(T);
  auto prefetch_run = [run_bytes](const T* p) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t b = 0; b < run_bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
  };
#ifdef SPRUCE_PA_AVX512
  const bool wide = d % 16 == 0;
#else
  const bool wide = false;
#endif
  constexpr int64_t kAhead = 16;
  if (wide) {
#ifdef SPRUCE_PA_AVX512
    scores_avx512<T>(kbase, vbase, offs, n, nh, rph, q, lim, d, scores, ps, run_bytes);
#endif
  } else {
  for (int64_t i = 0; i < std::min(kAhead, n); ++i) prefetch_run(kbase + offs[i]);
  // As scores_avx512: whole groups of 8 keys, the last padded, so scores do not depend on n.
  for (int64_t t = 0; t < n; t += 8) {
    for (int64_t i = t + kAhead; i < std::min(n, t + kAhead + 8); ++i) prefetch_run(kbase + offs[i]);
    for (int64_t hl = 0; hl < nh; ++hl) {
      const T* kr[8];
      for (int i = 0; i < 8; ++i) kr[i] = kbase + offs[std::min(t + i, n - 1)] + hl * d;
      for (int64_t r = hl * rph; r < (hl + 1) * rph; ++r) {
        if (lim[r] <= t) continue;
        const float* qr = q + r * d;
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
        for (int64_t c = 0; c < nc; ++c) {
          __m256 qv = _mm256_loadu_ps(qr + 8 * c);
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, load8(kr[i] + 8 * c), a[i]);
        }
        _mm256_storeu_ps(scores + r * ps + t, reduce8(a));
      }
    }
  }
  }  // !wide
  // Pass 2: softmax numerators in place; everything past a row's limit becomes an exact 0 so the
  // row tiles of pass 3 can run to the tile's longest row.
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * ps;
    const int64_t nr = std::min(lim[r], n);
    float mx = kNegInf;
    if (nr > 0) {
      masks.fill(r, s, nr, kNegInf);
      __m256 mv = _mm256_set1_ps(kNegInf);
      int64_t i = 0;
      for (; i + 8 <= nr; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
      mx = hmax(mv);
      for (; i < nr; ++i) mx = std::max(mx, s[i]);
    }
    if (mx == kNegInf) {  // nothing visible (in this partition)
      m[r] = kNegInf;
      l[r] = 0.f;
      std::fill(s, s + n, 0.f);
      continue;
    }
    int64_t i = 0;
    const __m256 mb = _mm256_set1_ps(mx);
    for (; i + 8 <= nr; i += 8) _mm256_storeu_ps(s + i, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), mb)));
    if (i < nr) {  // tail through the same exp so every score gets identical rounding
      alignas(32) float tmp[8];
      for (int j = 0; j < 8; ++j) tmp[j] = i + j < nr ? s[i + j] - mx : -100.f;
      _mm256_store_ps(tmp, exp256(_mm256_load_ps(tmp)));
      for (int64_t j = 0; i + j < nr; ++j) s[i + j] = tmp[j];
    }
    std::fill(s + nr, s + n, 0.f);
    // exp256 clamps its input, so a masked score came out ~1e-38, not 0: zeroing it keeps it
    // out of P @ V and the sum exactly.
    masks.fill(r, s, nr, 0.f);
    m[r] = mx;
    l[r] = softmax_sum_fp64(s, nr);
  }
  // Pass 3: acc += P @ V, per head in tiles of up to 3 rows over the tile's longest row. One
  // tile's sweep reads only its head's slice of each token's V, so sweeping all tokens per tile
  // would bring each token's V lines in from memory once per slice; instead all tiles sweep a
  // window of tokens small enough to stay in L1, and the next window is prefetched meanwhile.
  constexpr int64_t kWindow = 16;
  const int64_t nmax = rows ? std::min(n, *std::max_element(lim, lim + rows)) : 0;
  std::fill(acc, acc + rows * d, 0.f);
  for (int64_t i = 0; i < std::min(kWindow, nmax); ++i) prefetch_run(vbase + offs[i]);
  for (int64_t w0 = 0; w0 < nmax; w0 += kWindow) {
    for (int64_t i = w0 + kWindow; i < std::min(nmax, w0 + 2 * kWindow); ++i)
      prefetch_run(vbase + offs[i]);
    for (int64_t hl = 0; hl < nh; ++hl) {
      const T* vb = vbase + hl * d;
      for (int64_t r = hl * rph, end = (hl + 1) * rph; r < end; r += 3) {
        const int64_t ng = std::min<int64_t>(3, end - r);
        const int64_t nt = std::min({kWindow, n - w0, lim[r + ng - 1] - w0});
        if (nt <= 0) continue;
        const float* p = scores + r * ps + w0;
        float* a = acc + r * d;
#ifdef SPRUCE_PA_AVX512
        if (wide) {
          if (ng == 3) pv_rows512<T, 3>(vb, offs + w0, nt, p, ps, d, a, d);
          else if (ng == 2) pv_rows512<T, 2>(vb, offs + w0, nt, p, ps, d, a, d);
          else pv_rows512<T, 1>(vb, offs + w0, nt, p, ps, d, a, d);
          continue;
        }
#endif
        if (ng == 3)
          pv_rows<T, 3>(vb, offs + w0, nt, p, ps, d, a, d);
        else if (ng == 2)
          pv_rows<T, 2>(vb, offs + w0, nt, p, ps, d, a, d);
        else
          pv_rows<T, 1>(vb, offs + w0, nt, p, ps, d, a, d);
      }
    }
  }
}

#endif  // SPRUCE_PA_AVX2

// Portable version of attend_avx2 with the same contract (any head_dim).
template <typename T>
void attend_scalar(const T* kbase, const T* vbase, const int64_t* offs, int64_t n, int64_t nh,
                   int64_t rph, const float* q, const int64_t* lim, const RowMasks& masks, int64_t d,
                   float* scores, float* acc, float* m, float* l) {
  const int64_t ps = (n + 7) & ~int64_t(7);
  for (int64_t r = 0; r < nh * rph; ++r) {
    const int64_t nr = std::min(lim[r], n), hoff = (r / rph) * d;
    float* s = scores + r * ps;
    const float* qr = q + r * d;
    float mx = kNegInf;
    for (int64_t t = 0; t < nr; ++t) {
      if (masks.masked(r, t)) continue;
      const T* kr = kbase + offs[t] + hoff;
      float dot = 0.f;
      for (int64_t c = 0; c < d; ++c) dot += qr[c] * to_float(kr[c]);
      s[t] = dot;
      mx = std::max(mx, dot);
    }
    float* a = acc + r * d;
    std::fill(a, a + d, 0.f);
    float sum = 0.f;
    for (int64_t t = 0; t < nr && mx != kNegInf; ++t) {
      if (masks.masked(r, t)) continue;
      const float p = std::exp(s[t] - mx);
      sum += p;
      const T* vr = vbase + offs[t] + hoff;
      for (int64_t c = 0; c < d; ++c) a[c] += p * to_float(vr[c]);
    }
    m[r] = mx;
    l[r] = sum;
  }
}

// ---------------------------------------------------------------------------------------------

struct Args {
  Geometry geo;
  const char* q;
  at::ScalarType q_dtype;
  int64_t q_es, q_s0, q_s1;  // element size, strides (elements) of q over tokens and heads
  char* out;
  at::ScalarType out_dtype;
  int64_t o_es, o_s0, o_s1;
  const int64_t* seq_lens;
  const int64_t* qsl;  // query_start_loc, or null for one query token per request
  float scale;
  const uint8_t* tree_mask;            // flat [sum of ql*ql over tree requests], or null
  const int64_t* tree_mask_offsets;    // [B]: request b's ql x ql mask at this offset, -1 = none
};

inline int64_t q_start(const Args& a, int64_t b) { return a.qsl ? a.qsl[b] : b; }
inline int64_t q_len(const Args& a, int64_t b) { return a.qsl ? a.qsl[b + 1] - a.qsl[b] : 1; }

template <typename T>
void run_item(const Args& A, const T* kc, const T* vc, const Item& it, Scratch& sc,
              int64_t slot_rows, float* part_m, float* part_l, float* part_acc, bool scalar) {
  const Geometry& G = A.geo;
  const int64_t d = G.d, g = G.g, rows = it.nh * it.nq * g, n = it.t1 - it.t0;
  const int64_t ql = q_len(A, it.b), sl = A.seq_lens[it.b], qs = q_start(A, it.b);
  const int64_t ps = (n + 7) & ~int64_t(7);
  if ((int64_t)sc.q.size() < rows * d) sc.q.resize(rows * d);
  if ((int64_t)sc.acc.size() < rows * d) sc.acc.resize(rows * d);
  if ((int64_t)sc.m.size() < rows) sc.m.resize(rows), sc.l.resize(rows), sc.lim.resize(rows);
  const int64_t mask_off = A.tree_mask ? A.tree_mask_offsets[it.b] : -1;
  sc.masks.any = mask_off >= 0;
  if (sc.masks.any && (int64_t)sc.masks.row.size() < rows) sc.masks.row.resize(rows), sc.masks.start.resize(rows);
  if ((int64_t)sc.scores.size() < rows * ps) sc.scores.resize(rows * ps);
  if ((int64_t)sc.offs.size() < n) sc.offs.resize(n);

  const int64_t* table = G.tables + it.b * G.table_stride;
  for (int64_t i = 0, blk = it.t0 / G.block_size, o = it.t0 % G.block_size; i < n; ++i) {
    sc.offs[i] = table[blk] * G.block_stride + o * G.tok_stride;
    if (++o == G.block_size) o = 0, ++blk;
  }
  for (int64_t r = 0; r < rows; ++r) {
    int64_t j, h;
    row_coords(r, it.nq, g, it.h0, &j, &h);
    const int64_t tok = qs + it.q0 + j;
    load_row(A.q + (tok * A.q_s0 + h * A.q_s1) * A.q_es, A.q_dtype, d, A.scale,
             sc.q.data() + r * d);
    // Query j of the request sits at position sl - ql + j and sees tokens up to and including it.
    sc.lim[r] = std::min(std::max<int64_t>(sl - ql + it.q0 + j + 1 - it.t0, 0), n);
    if (sc.masks.any) {
      sc.masks.row[r] = A.tree_mask + mask_off + (it.q0 + j) * ql;
      sc.masks.start[r] = sl - ql - it.t0;
    }
  }
  const T* kb = kc + it.h0 * d;
  const T* vb = vc + it.h0 * d;
#ifdef SPRUCE_PA_AVX2
  if (!scalar)
    attend_avx2<T>(kb, vb, sc.offs.data(), n, it.nh, it.nq * g, sc.q.data(), sc.lim.data(), sc.masks, d,
                   sc.scores.data(), sc.acc.data(), sc.m.data(), sc.l.data());
  else
#endif
    attend_scalar<T>(kb, vb, sc.offs.data(), n, it.nh, it.nq * g, sc.q.data(), sc.lim.data(), sc.masks, d,
                     sc.scores.data(), sc.acc.data(), sc.m.data(), sc.l.data());

  if (it.slot < 0) {
    for (int64_t r = 0; r < rows; ++r) {
      int64_t j, h;
      row_coords(r, it.nq, g, it.h0, &j, &h);
      store_row(A.out + ((qs + it.q0 + j) * A.o_s0 + h * A.o_s1) * A.o_es, A.out_dtype, d,
                sc.acc.data() + r * d, 1.f / sc.l[r]);
    }
  } else {
    std::memcpy(part_m + it.slot * slot_rows, sc.m.data(), rows * sizeof(float));
    std::memcpy(part_l + it.slot * slot_rows, sc.l.data(), rows * sizeof(float));
    std::memcpy(part_acc + it.slot * slot_rows * d, sc.acc.data(), rows * d * sizeof(float));
  }
}

template <typename F>
void run_parallel(int64_t n_items, int64_t total_cost, const F& fn) {
  int nt = 1;
#ifdef _OPENMP
  // cost ~ rows x tokens, ~10 ns each: below ~40 us of work the fork/join is not worth it.
  if (total_cost >= (1 << 12)) nt = std::max(1, std::min<int>(at::get_num_threads(), (int)n_items));
#endif
  std::atomic<int64_t> next{0};
  if (nt == 1) {
    Scratch sc;
    for (int64_t i = 0; i < n_items; ++i) fn(i, sc);
    return;
  }
#ifdef _OPENMP
  std::exception_ptr err = nullptr;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(nt)
  {
    Scratch sc;
    // Dynamic: items differ in length by orders of magnitude.
    for (int64_t i; !failed.load(std::memory_order_relaxed) && (i = next.fetch_add(1)) < n_items;) {
      try {
        fn(i, sc);
      } catch (...) {
#pragma omp critical
        if (!failed.exchange(true)) err = std::current_exception();
      }
    }
  }
  if (err) std::rethrow_exception(err);
#endif
}

template <typename T>
void run_all(const Args& A, const at::Tensor& key_cache, const at::Tensor& value_cache,
             int64_t num_reqs) {
  const Geometry& G = A.geo;
  const T* kc = key_cache.data_ptr<T>();
  const T* vc = value_cache.data_ptr<T>();
  const bool scalar = g_force_scalar || (G.d % 8) != 0;

  int nthreads = 1;
#ifdef _OPENMP
  nthreads = at::get_num_threads();
#endif
  const int64_t want = 4 * (int64_t)nthreads;  // items enough for the dynamic schedule to balance
  // A one-token query (decode) takes all KV heads in one item, so each context token's K and V
  // are read as one contiguous run -- unless there are too few requests to go round. Longer
  // queries go per KV head in tiles of ~16 rows, which keeps the score buffer small while each
  // K/V row still serves many rows.
  const int64_t qt = std::max<int64_t>(1, 16 / G.g);
  int64_t n_decode = 0;
  for (int64_t b = 0; b < num_reqs; ++b) n_decode += q_len(A, b) == 1;
  const int64_t decode_heads = (nthreads == 1 || n_decode >= want) ? G.hkv : 1;
  auto heads_per_item = [&](int64_t ql) { return ql == 1 ? decode_heads : int64_t(1); };
  int64_t base_items = 0, max_ctx = 0;
  for (int64_t b = 0; b < num_reqs; ++b) {
    const int64_t ql = q_len(A, b);
    if (ql <= 0) continue;
    base_items += (G.hkv / heads_per_item(ql)) * ((ql + qt - 1) / qt);
    max_ctx = std::max(max_ctx, A.seq_lens[b]);
  }
  if (base_items == 0) return;
  // Split long contexts only when there are still too few items (one or two long requests).
  int64_t part_len = std::numeric_limits<int64_t>::max();
  if (nthreads > 1 && base_items < want) {
    const int64_t splits = (want + base_items - 1) / base_items;
    part_len = std::max<int64_t>(512, (max_ctx + splits - 1) / splits);
    part_len = (part_len + 7) & ~int64_t(7);
  }

  std::vector<Item> items;
  std::vector<Group> groups;
  int64_t slots = 0, total_cost = 0;
  for (int64_t b = 0; b < num_reqs; ++b) {
    const int64_t ql = q_len(A, b), sl = A.seq_lens[b];
    if (ql <= 0) continue;
    const int64_t nh = heads_per_item(ql);
    for (int64_t q0 = 0; q0 < ql; q0 += qt) {
      const int64_t nq = std::min(qt, ql - q0);
      const int64_t need = sl - ql + q0 + nq;  // context the tile's last query sees
      const int64_t nparts = 1 + (need - 1) / part_len;  // need >= 1; no overflow at max part_len
      for (int64_t h0 = 0; h0 < G.hkv; h0 += nh) {
        if (nparts > 1) groups.push_back({b, h0, nh, q0, nq, slots, nparts});
        for (int64_t p = 0; p < nparts; ++p) {
          const int64_t t0 = p * part_len, t1 = std::min(need, t0 + part_len);
          const int64_t cost = (t1 - t0 + 16) * nh * nq * G.g;
          items.push_back({b, h0, nh, q0, nq, t0, t1, nparts > 1 ? slots++ : -1, cost});
          total_cost += cost;
        }
      }
    }
  }
  // Longest first, so the dynamic schedule does not end on one straggler.
  std::vector<int64_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = (int64_t)i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return items[a].cost > items[b].cost; });

  // Partial results of partitioned items, rmax rows per slot whatever the item's own row count.
  const int64_t rmax = std::max(qt * G.g, G.hkv * G.g);
  std::vector<float> pm(slots * rmax), pl(slots * rmax), pacc(slots * rmax * G.d);
  run_parallel((int64_t)items.size(), total_cost, [&](int64_t i, Scratch& sc) {
    run_item<T>(A, kc, vc, items[order[i]], sc, rmax, pm.data(), pl.data(), pacc.data(), scalar);
  });

  if (groups.empty()) return;
  run_parallel((int64_t)groups.size(), total_cost, [&](int64_t gi, Scratch& sc) {
    const Group& gr = groups[gi];
    const int64_t rows = gr.nh * gr.nq * G.g, d = G.d, qs = q_start(A, gr.b);
    if ((int64_t)sc.acc.size() < d) sc.acc.resize(d);
    for (int64_t r = 0; r < rows; ++r) {
      float mx = kNegInf;
      for (int64_t p = 0; p < gr.nparts; ++p) mx = std::max(mx, pm[(gr.slot0 + p) * rmax + r]);
      float* o = sc.acc.data();
      std::fill(o, o + d, 0.f);
      float sum = 0.f;
      for (int64_t p = 0; p < gr.nparts; ++p) {
        const int64_t s = gr.slot0 + p;
        const float lp = pl[s * rmax + r];
        if (lp == 0.f) continue;  // partition wholly after this query's position
        const float w = std::exp(pm[s * rmax + r] - mx);
        sum += w * lp;
        const float* a = pacc.data() + (s * rmax + r) * d;
        for (int64_t c = 0; c < d; ++c) o[c] += w * a[c];
      }
      int64_t j, h;
      row_coords(r, gr.nq, G.g, gr.h0, &j, &h);
      store_row(A.out + ((qs + gr.q0 + j) * A.o_s0 + h * A.o_s1) * A.o_es, A.out_dtype, d, o,
                1.f / sum);
    }
  });
}

bool float_like(at::ScalarType s) {
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

void paged_attention_impl(at::Tensor& out, const at::Tensor& q, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_tables,
                          const at::Tensor& seq_lens, const at::Tensor* query_start_loc,
                          double scale, const at::Tensor* tree_mask = nullptr,
                          const at::Tensor* tree_mask_offsets = nullptr) {
  TORCH_CHECK(q.device().is_cpu() && out.device().is_cpu() && key_cache.device().is_cpu(),
              "paged_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && out.sizes() == q.sizes(),
              "paged_attention: q and out must be [T, H, D] of one shape");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "paged_attention: caches must be [num_blocks, block_size, Hkv, D] of one shape");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_attention: caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type() &&
                  float_like(key_cache.scalar_type()),
              "paged_attention: caches must both be float32, bfloat16 or float16");
  TORCH_CHECK(float_like(q.scalar_type()) && float_like(out.scalar_type()),
              "paged_attention: q/out must be float32, bfloat16 or float16");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "paged_attention: head_dim must be unit-stride");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "paged_attention: block_tables and seq_lens must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "paged_attention: block_tables must be [B, max_blocks] with unit inner stride");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.is_contiguous(), "paged_attention: seq_lens [B]");
  const int64_t nb = key_cache.size(0), bs = key_cache.size(1), hkv = key_cache.size(2),
                d = key_cache.size(3);
  const int64_t T = q.size(0), H = q.size(1), B = seq_lens.size(0);
  TORCH_CHECK(q.size(2) == d, "paged_attention: q head_dim ", q.size(2), " != cache head_dim ", d);
  TORCH_CHECK(H % hkv == 0, "paged_attention: ", H, " query heads not a multiple of ", hkv, " KV heads");
  TORCH_CHECK(block_tables.size(0) >= B, "paged_attention: block_tables has fewer rows than seq_lens");

  const int64_t* sl = seq_lens.data_ptr<int64_t>();
  const int64_t* qsl = nullptr;
  if (query_start_loc) {
    TORCH_CHECK(query_start_loc->scalar_type() == at::kLong && query_start_loc->is_contiguous() &&
                    query_start_loc->dim() == 1 && query_start_loc->size(0) == B + 1,
                "paged_attention: query_start_loc must be int64 [B + 1]");
    qsl = query_start_loc->data_ptr<int64_t>();
    TORCH_CHECK(qsl[0] >= 0 && qsl[B] <= T, "paged_attention: query_start_loc out of range");
  } else {
    TORCH_CHECK(B == T, "paged_attention_decode: one query token per request (", T, " tokens, ", B,
                " requests)");
  }
  // Validate everything the kernels will dereference, here, single-threaded: an out-of-range
  // block id would otherwise read arbitrary memory.
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t tstride = block_tables.stride(0), width = block_tables.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ql = qsl ? qsl[b + 1] - qsl[b] : 1;
    TORCH_CHECK(ql >= 0, "paged_attention: query_start_loc must be nondecreasing");
    if (ql == 0) continue;
    TORCH_CHECK(sl[b] >= ql, "paged_attention: request ", b, " has seq_len ", sl[b], " < its ", ql,
                " query tokens");
    const int64_t used = (sl[b] + bs - 1) / bs;
    TORCH_CHECK(used <= width, "paged_attention: request ", b, " needs ", used,
                " blocks, table has ", width);
    for (int64_t i = 0; i < used; ++i) {
      const int64_t blk = tables[b * tstride + i];
      TORCH_CHECK(blk >= 0 && blk < nb, "paged_attention: block id ", blk, " out of range");
    }
  }

  const uint8_t* tm = nullptr;
  const int64_t* tmo = nullptr;
  if (tree_mask) {
    TORCH_CHECK(qsl && tree_mask_offsets, "paged_attention: a tree mask needs query_start_loc and offsets");
    TORCH_CHECK(tree_mask->dim() == 1 && tree_mask->is_contiguous() && tree_mask->element_size() == 1,
                "paged_attention: tree_mask must be a contiguous 1-D bool/uint8 tensor");
    TORCH_CHECK(tree_mask_offsets->scalar_type() == at::kLong && tree_mask_offsets->is_contiguous() &&
                    tree_mask_offsets->dim() == 1 && tree_mask_offsets->size(0) == B,
                "paged_attention: tree_mask_offsets must be int64 [B]");
    tm = static_cast<const uint8_t*>(tree_mask->data_ptr());
    tmo = tree_mask_offsets->data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t ql = qsl[b + 1] - qsl[b];
      TORCH_CHECK(tmo[b] == -1 || (tmo[b] >= 0 && tmo[b] + ql * ql <= tree_mask->numel()),
                  "paged_attention: request ", b, "'s tree mask (offset ", tmo[b], ", ", ql, "x", ql,
                  ") lies outside tree_mask");
    }
  }

  Args A;
  A.geo = {bs, hkv, d, H / hkv, hkv * d, bs * hkv * d, tables, tstride};
  A.q = static_cast<const char*>(q.data_ptr());
  A.q_dtype = q.scalar_type();
  A.q_es = q.element_size();
  A.q_s0 = q.stride(0);
  A.q_s1 = q.stride(1);
  A.out = static_cast<char*>(out.data_ptr());
  A.out_dtype = out.scalar_type();
  A.o_es = out.element_size();
  A.o_s0 = out.stride(0);
  A.o_s1 = out.stride(1);
  A.seq_lens = sl;
  A.qsl = qsl;
  A.scale = static_cast<float>(scale);
  A.tree_mask = tm;
  A.tree_mask_offsets = tmo;

  switch (key_cache.scalar_type()) {
    case at::kFloat:
      run_all<float>(A, key_cache, value_cache, B);
      break;
    case at::kBFloat16:
      run_all<c10::BFloat16>(A, key_cache, value_cache, B);
      break;
    default:
      run_all<c10::Half>(A, key_cache, value_cache, B);
      break;
  }
}

}  // namespace

// key_cache/value_cache [num_blocks, block_size, Hkv, D] at flat slots slot_mapping[t] <- k/v[t].
// One memcpy per token and tensor, on the calling thread: a decode step writes a few KB, which
// two index_copy_ calls took ~33 us a layer to do (TensorIterator set-up, thread fork) against
// ~11 us here, with the cache already resident. (First writes into the lazily zeroed cache cost
// page faults whoever writes; that is not what this saves.)
void write_kv(at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "write_kv: caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.device().is_cpu(), "write_kv: slot_mapping must be a 1-D int64 CPU tensor");
  const int64_t t = slot_mapping.size(0);
  const int64_t row = key_cache.size(2) * key_cache.size(3);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t es = key_cache.element_size();
  for (const at::Tensor* src : {&k, &v}) {
    TORCH_CHECK(src->scalar_type() == key_cache.scalar_type(), "write_kv: k/v dtype must match the cache");
    TORCH_CHECK(src->dim() == 3 && src->size(0) == t && src->size(1) * src->size(2) == row &&
                    src->stride(2) == 1 && src->stride(1) == src->size(2),
                "write_kv: k/v must be [T, Hkv, D] with contiguous rows");
  }
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == key_cache.scalar_type(),
              "write_kv: key and value caches differ");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "write_kv: slot ", slots[i], " out of range");
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * es, vs = v.stride(0) * es, bytes = row * es;
  for (int64_t i = 0; i < t; ++i) {
    std::memcpy(kc + slots[i] * bytes, kp + i * ks, bytes);
    std::memcpy(vc + slots[i] * bytes, vp + i * vs, bytes);
  }
}

void paged_attention_decode(at::Tensor out, const at::Tensor& q, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale) {
  paged_attention_impl(out, q, key_cache, value_cache, block_tables, seq_lens, nullptr, scale);
}

void paged_attention_varlen(at::Tensor out, const at::Tensor& q, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                            double scale, const c10::optional<at::Tensor>& tree_mask,
                            const c10::optional<at::Tensor>& tree_mask_offsets) {
  const bool tree = tree_mask.has_value() && tree_mask->defined();
  TORCH_CHECK(tree == (tree_mask_offsets.has_value() && tree_mask_offsets->defined()),
              "paged_attention_varlen: tree_mask and tree_mask_offsets come together");
  paged_attention_impl(out, q, key_cache, value_cache, block_tables, seq_lens, &query_start_loc,
                       scale, tree ? &*tree_mask : nullptr, tree ? &*tree_mask_offsets : nullptr);
}

bool has_avx2() {
#ifdef SPRUCE_PA_AVX2
  return true;
#else
  return false;
#endif
}

void set_force_scalar(bool on) { g_force_scalar = on; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode,
        "out[B,H,D] = attention of q[B,H,D] (one token per request) over the paged KV cache");
  m.def("paged_attention_varlen", &paged_attention_varlen,
        "out[T,H,D] = causal attention of flat q[T,H,D] over the paged KV cache; with a tree mask "
        "(flat bool, per-request offsets, -1 = causal) a request's query tokens see among themselves "
        "only what its ql x ql mask allows",
        py::arg("out"), py::arg("q"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("block_tables"), py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("scale"),
        py::arg("tree_mask") = py::none(), py::arg("tree_mask_offsets") = py::none());
  m.def("write_kv", &write_kv, "key/value_cache[slot_mapping[t]] = k/v[t] (flat slots)");
  m.def("has_avx2", &has_avx2, "whether the AVX2 kernels were compiled in");
  m.def("set_force_scalar", &set_force_scalar, "use the portable kernels (tests)");
  m.def("skinny_linear", &skinny_linear,
        "out[m,n] = x[m,k] @ w[n,k]^T (+ bias), fp32, streaming w once (decode-sized m)",
        py::arg("out"), py::arg("x"), py::arg("w"), py::arg("bias") = py::none(),
        py::arg("force_scalar") = false);
  m.def("quant_linear", &quant_linear,
        "out[m,n] = x[m,k] @ dequant(w)[n,k]^T (+ bias) for GGUF Q4_1 (format 0) / Q8_0 (format 1) blocks",
        py::arg("out"), py::arg("x"), py::arg("format"), py::arg("qs"), py::arg("scale"),
        py::arg("min") = py::none(), py::arg("bias") = py::none(), py::arg("force_scalar") = false);
  m.def("quant_bf16_available", &quant_bf16_available, "whether quant_linear_bf16 was built (AVX-512 BF16)");
  m.def("quant_linear_bf16", &quant_linear_bf16,
        "out[m,n] = x[m,k] @ dequant(w)[n,k]^T (+ fp32 bias), bf16, on GGUF Q4_1 / Q8_0 blocks",
        py::arg("out"), py::arg("x"), py::arg("format"), py::arg("qs"), py::arg("scale"),
        py::arg("min") = py::none(), py::arg("bias") = py::none());
  m.def("amx_available", &amx_available, "whether the AMX bf16 GEMM was built and the OS grants AMX");
  m.def("amx_pack_weight", &amx_pack_weight, "w[n,k] bf16 -> its AMX B-tile layout for amx_linear");
  m.def("amx_linear", &amx_linear, "out[m,n] = x[m,k] @ w[n,k]^T (+ bias), bf16 on AMX, w packed",
        py::arg("out"), py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("bias") = py::none());
  m.def("rms_norm", &rms_norm, "out = x * rsqrt(mean(x^2) + eps) * weight, per row (fp32 / bf16)");
  m.def("add_rms_norm", &add_rms_norm,
        "residual += x in place, then out = rms_norm(residual) * weight");
  m.def("set_force_scalar_elementwise", &set_force_scalar_elementwise,
        "use the portable loops of the fused elementwise ops (tests)");
  m.def("silu_and_mul", &silu_and_mul, "out = silu(gate_up[:, :d]) * gate_up[:, d:]");
  m.def("rope_inplace", &rope_inplace,
        "qk[t, h] = qk * cos[pos[t]] + rotate_half(qk) * sin[pos[t]] in place (sin signed)");
}

// The transformer layer's elementwise work, fused: RMSNorm (with the residual add), SiLU-and-mul,
// and rotary embedding in place.
//
// On CPU these run between the GEMMs and are memory-bound, and in bf16 torch runs each as several
// passes (upcast, op, round, and a fresh tensor per step): profiling W1 in bf16 put them at about
// half of the time, more than the GEMMs. Here each is one pass over its rows in fp32 registers.
//
// Rounding follows the torch/transformers sequence the model used before, so bf16 outputs stay
// within a rounding of it: RMSNorm rounds x * rsqrt(mean(x^2) + eps) to the dtype before scaling
// by the weight; SiLU rounds silu(gate) before multiplying by up; the residual sum is rounded.
//
// Each op has an AVX-512 kernel (16 fp32 lanes, masked tails) where the build enables it, and a
// portable loop over fp32 values otherwise (bf16 converted with integer ops, exp a polynomial).
#include "fused_ops.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

bool g_force_scalar_ew = false;   // tests flip it to cover the portable loops

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// exp(x) for x <= 0 (silu only needs exp(-|g|)): 2^n * p(r), r in [-ln2/2, ln2/2], degree-6
// polynomial (relative error ~2e-7); below -87 it flushes to 0.
inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.3888949e-03f;
  p = p * r + 8.3333164e-03f;
  p = p * r + 4.1666720e-02f;
  p = p * r + 1.6666666e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// silu(g) = g / (1 + exp(-g)), computed from exp(-|g|) so it never overflows.
inline float silu(float g) {
  const float e = exp_neg(-std::fabs(g));
  const float sig = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  return g * sig;
}

// Element access for fp32 / bf16 rows, so each kernel is written once.
template <typename T> struct Elem;
template <> struct Elem<float> {
  using raw = float;
  static inline float load(const float* p, int64_t i) { return p[i]; }
  static inline void store(float* p, int64_t i, float v) { p[i] = v; }
  static inline float round(float v) { return v; }
};
template <> struct Elem<c10::BFloat16> {
  using raw = uint16_t;
  static inline float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
  static inline void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
  static inline float round(float v) { return round_bf16(v); }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SPRUCE_EW_AVX512 1
// 16 fp32 lanes per step with masked tails (the compiler does not vectorise the scalar loops
// below well: the bf16 rounding and exp's float->int steps defeat it).
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}
inline __m512 vload(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 vload(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512i bf16_bits(__m512 v) {  // round to nearest even, NaN kept quiet
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
}
inline void vstore(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void vstore(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bf16_bits(v)));
}
inline __m512 vround(const float*, __m512 v) { return v; }
inline __m512 vround(const uint16_t*, __m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}
// exp as exp_neg above does it, over the whole float range (clamped to +-88; scalef does 2^n).
inline __m512 vexp(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.3888949e-03f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3333164e-03f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1666720e-02f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666666e-01f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

template <typename R>
void rms_norm_row_avx512(const R* x, R* res, const R* w, R* out, int64_t d, float eps) {
  __m512 ss = _mm512_setzero_ps();
  const R* src = res ? res : x;
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail_mask(d - i);
    __m512 v = vload(x + i, m);
    if (res) {
      v = vround(x, _mm512_add_ps(v, vload(res + i, m)));
      vstore(res + i, v, m);
    }
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(d) + eps));
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail_mask(d - i);
    vstore(out + i, _mm512_mul_ps(vround(x, _mm512_mul_ps(vload(src + i, m), inv)), vload(w + i, m)), m);
  }
}

template <typename R>
void silu_and_mul_row_avx512(const R* g, const R* u, R* o, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail_mask(d - i);
    const __m512 gv = vload(g + i, m);
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), vexp(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    vstore(o + i, _mm512_mul_ps(vround(g, s), vload(u + i, m)), m);
  }
}

template <typename R>
void rope_head_avx512(R* x, const R* c, const R* s, int64_t half) {
  for (int64_t j = 0; j < half; j += 16) {
    const __mmask16 m = tail_mask(half - j);
    const __m512 a = vload(x + j, m), b = vload(x + half + j, m);
    const __m512 na = _mm512_fmadd_ps(b, vload(s + j, m), vround(x, _mm512_mul_ps(a, vload(c + j, m))));
    const __m512 nb = _mm512_fmadd_ps(a, vload(s + half + j, m), vround(x, _mm512_mul_ps(b, vload(c + half + j, m))));
    vstore(x + j, na, m);
    vstore(x + half + j, nb, m);
  }
}
#endif

template <typename T>
inline typename Elem<T>::raw* raw_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Elem<T>::raw*>(t.data_ptr());
}

// Rows per parallel task: enough work to amortise a task (~a few microseconds).
inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

// out = norm(x) * w; with `residual`, first residual = x + residual (in place) and normalise that.
template <typename T>
void rms_norm_rows(at::Tensor& out, const at::Tensor& x, at::Tensor* residual, const at::Tensor& w,
                   double eps) {
  using E = Elem<T>;
  const int64_t rows = x.size(0), d = x.size(1);
  const auto* xp = raw_ptr<T>(x);
  auto* op = raw_ptr<T>(out);
  auto* rp = residual ? raw_ptr<T>(*residual) : nullptr;
  const auto* wp = raw_ptr<T>(w);
  const int64_t xs = x.stride(0), os = out.stride(0), rs = residual ? residual->stride(0) : 0;
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, rows, grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto* xr = xp + r * xs;
      auto* orow = op + r * os;
#ifdef SPRUCE_EW_AVX512
      if (!g_force_scalar_ew) {
        rms_norm_row_avx512(xr, rp ? rp + r * rs : nullptr, wp, orow, d, epsf);
        continue;
      }
#endif
      const decltype(xr) src = rp ? rp + r * rs : xr;
      float ss = 0.0f;
      if (rp) {
        auto* rr = rp + r * rs;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; ++i) {
          const float v = E::round(E::load(xr, i) + E::load(rr, i));
          E::store(rr, i, v);
          ss += v * v;
        }
      } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; ++i) {
          const float v = E::load(xr, i);
          ss += v * v;
        }
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + epsf);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i)
        E::store(orow, i, E::round(E::load(src, i) * inv) * E::load(wp, i));
    }
  });
}

template <typename T>
void silu_and_mul_rows(at::Tensor& out, const at::Tensor& gate_up) {
  using E = Elem<T>;
  const int64_t rows = gate_up.size(0), d = out.size(1);
  const auto* gp = raw_ptr<T>(gate_up);
  auto* op = raw_ptr<T>(out);
  const int64_t gs = gate_up.stride(0), os = out.stride(0);
  at::parallel_for(0, rows, grain(2 * d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto* g = gp + r * gs;
      const auto* u = g + d;
      auto* o = op + r * os;
#ifdef SPRUCE_EW_AVX512
      if (!g_force_scalar_ew) {
        silu_and_mul_row_avx512(g, u, o, d);
        continue;
      }
#endif
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) E::store(o, i, E::round(silu(E::load(g, i))) * E::load(u, i));
    }
  });
}

// qk[t, h, :] = qk * cos[pos[t]] + rotate_half(qk) * sin[pos[t]], in place; sin carries the sign
// of rotate_half (its first half is -sin), as the model's tables do.
template <typename T>
void rope_rows(at::Tensor& qk, const at::Tensor& positions, const at::Tensor& cos,
               const at::Tensor& sin) {
  using E = Elem<T>;
  const int64_t t = qk.size(0), nh = qk.size(1), d = qk.size(2), half = d / 2;
  auto* qp = raw_ptr<T>(qk);
  const auto* cp = raw_ptr<T>(cos);
  const auto* sp = raw_ptr<T>(sin);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t ts = qk.stride(0), hs = qk.stride(1), cs = cos.stride(0), ss = sin.stride(0);
  at::parallel_for(0, t, grain(nh * d), [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i) {
      const auto* c = cp + pos[i] * cs;
      const auto* s = sp + pos[i] * ss;
      for (int64_t h = 0; h < nh; ++h) {
        auto* x = qp + i * ts + h * hs;
#ifdef SPRUCE_EW_AVX512
        if (!g_force_scalar_ew) {
          rope_head_avx512(x, c, s, half);
          continue;
        }
#endif
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float a = E::load(x, j), b = E::load(x, j + half);
          const float na = E::round(a * E::load(c, j)) + b * E::load(s, j);
          const float nb = E::round(b * E::load(c, j + half)) + a * E::load(s, j + half);
          E::store(x, j, na);
          E::store(x, j + half, nb);
        }
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* what, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == dim, what, " must be a ", dim, "-D CPU tensor");
  TORCH_CHECK(t.stride(-1) == 1, what, " must be contiguous in its last dimension");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what,
              " must be float32 or bfloat16");
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, " has dtype ", b.scalar_type(),
              ", expected ", a.scalar_type());
}

void check_norm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_rows(x, "x", 2);
  check_rows(out, "out", 2);
  check_same(x, out, "out");
  check_same(x, weight, "weight");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && out.sizes() == x.sizes(),
              op, ": shapes do not match");
}

}  // namespace

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(out, x, weight, "rms_norm");
  if (x.scalar_type() == at::kFloat) rms_norm_rows<float>(out, x, nullptr, weight, eps);
  else rms_norm_rows<c10::BFloat16>(out, x, nullptr, weight, eps);
}

void add_rms_norm(at::Tensor out, at::Tensor residual, const at::Tensor& x, const at::Tensor& weight,
                  double eps) {
  check_norm(out, x, weight, "add_rms_norm");
  check_rows(residual, "residual", 2);
  check_same(x, residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "add_rms_norm: shapes do not match");
  if (x.scalar_type() == at::kFloat) rms_norm_rows<float>(out, x, &residual, weight, eps);
  else rms_norm_rows<c10::BFloat16>(out, x, &residual, weight, eps);
}

void silu_and_mul(at::Tensor out, const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", 2);
  check_rows(out, "out", 2);
  check_same(gate_up, out, "out");
  TORCH_CHECK(gate_up.size(1) == 2 * out.size(1) && gate_up.size(0) == out.size(0),
              "silu_and_mul: out must be [rows, gate_up.size(1) / 2]");
  if (out.scalar_type() == at::kFloat) silu_and_mul_rows<float>(out, gate_up);
  else silu_and_mul_rows<c10::BFloat16>(out, gate_up);
}

void rope_inplace(at::Tensor qk, const at::Tensor& positions, const at::Tensor& cos,
                  const at::Tensor& sin) {
  check_rows(qk, "qk", 3);
  check_same(qk, cos, "cos");
  check_same(qk, sin, "sin");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.dim() == 1 && positions.size(0) == qk.size(0),
              "rope: positions must be a contiguous int64 [T] tensor");
  TORCH_CHECK(qk.size(2) % 2 == 0, "rope: head_dim must be even");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 2 && t->size(1) == qk.size(2) && t->stride(1) == 1,
                "rope: cos/sin must be [max_len, head_dim]");
  if (positions.numel() > 0) {
    const int64_t lo = positions.min().item<int64_t>(), hi = positions.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < cos.size(0), "rope: position ", lo < 0 ? lo : hi,
                " outside the table of ", cos.size(0));
  }
  if (qk.scalar_type() == at::kFloat) rope_rows<float>(qk, positions, cos, sin);
  else rope_rows<c10::BFloat16>(qk, positions, cos, sin);
}

void set_force_scalar_elementwise(bool on) { g_force_scalar_ew = on; }

// What the decode-sized GEMMs (skinny_gemm.cpp, quant_bf16.cpp) share: the GGUF block tensors'
// checks, and their threading -- the n output rows split into one contiguous, tile-aligned range
// per thread, so each thread streams its own part of the weight sequentially, which the
// hardware prefetcher follows.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spruce {

// Below ~64K weights the fork/join costs more than a second thread saves.
inline int gemm_threads(int64_t n, int64_t k) {
#ifdef _OPENMP
  if (n * k >= (1 << 16)) return std::max(1, at::get_num_threads());
#endif
  return 1;
}

// fn(a, b) on each thread's rows [a, b); every range but the last is a multiple of `tile`.
template <typename F>
void for_each_row_range(int64_t n, int64_t tile, int nt, const F& fn) {
  if (nt <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t tiles = (n + tile - 1) / tile;
    const int64_t a = std::min(n, tiles * t / T * tile), b = std::min(n, tiles * (t + 1) / T * tile);
    if (a < b) fn(a, b);
  }
#else
  fn(int64_t(0), n);
#endif
}

// A GGUF Q4_1 (format 0) / Q8_0 (format 1) weight as quant.py's QuantWeight holds it: qs [n, k/2]
// uint8 or [n, k] int8, scale (and Q4_1's min) float32 [n, k/32]. Returns {n, k}.
inline std::pair<int64_t, int64_t> check_quant_blocks(const char* op, int64_t format, const at::Tensor& qs,
                                                      const at::Tensor& scale,
                                                      const c10::optional<at::Tensor>& minv) {
  TORCH_CHECK(format == 0 || format == 1, op, ": format must be 0 (Q4_1) or 1 (Q8_0)");
  TORCH_CHECK(qs.device().is_cpu() && qs.dim() == 2 && qs.is_contiguous() && qs.element_size() == 1,
              op, ": qs must be a contiguous 2-D uint8/int8 CPU tensor");
  const int64_t n = qs.size(0), k = format == 0 ? qs.size(1) * 2 : qs.size(1);
  TORCH_CHECK(k % 32 == 0, op, ": k (", k, ") must be a multiple of 32");
  auto check_param = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                    t.size(0) == n && t.size(1) == k / 32,
                op, ": ", what, " must be a contiguous float32 [", n, ", ", k / 32, "] tensor");
  };
  check_param(scale, "scale");
  const bool has_min = minv.has_value() && minv->defined();
  TORCH_CHECK(has_min == (format == 0), op, ": Q4_1 needs min, Q8_0 takes none");
  if (has_min) check_param(*minv, "min");
  return {n, k};
}

}  // namespace spruce

// Declarations of skinny_gemm.cpp, registered in the extension's module (paged_attention.cpp).
#pragma once
#include <torch/extension.h>

void skinny_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                   const c10::optional<at::Tensor>& bias, bool force_scalar);
void quant_linear(at::Tensor out, const at::Tensor& x, int64_t format, const at::Tensor& qs,
                  const at::Tensor& scale, const c10::optional<at::Tensor>& minv,
                  const c10::optional<at::Tensor>& bias, bool force_scalar);

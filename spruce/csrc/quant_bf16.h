// Declarations of quant_bf16.cpp, registered in the extension's module (paged_attention.cpp).
#pragma once
#include <torch/extension.h>

bool quant_bf16_available();
void quant_linear_bf16(at::Tensor out, const at::Tensor& x, int64_t format, const at::Tensor& qs,
                       const at::Tensor& scale, const c10::optional<at::Tensor>& minv,
                       const c10::optional<at::Tensor>& bias);

// Declarations of amx_gemm.cpp, registered in the extension's module (paged_attention.cpp).
#pragma once
#include <torch/extension.h>

bool amx_available();
at::Tensor amx_pack_weight(const at::Tensor& w);
void amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed, int64_t n,
                const c10::optional<at::Tensor>& bias);

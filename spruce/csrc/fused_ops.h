// Declarations of fused_ops.cpp, registered in the extension's module (paged_attention.cpp).
#pragma once
#include <torch/extension.h>

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm(at::Tensor out, at::Tensor residual, const at::Tensor& x, const at::Tensor& weight,
                  double eps);
void silu_and_mul(at::Tensor out, const at::Tensor& gate_up);
void rope_inplace(at::Tensor qk, const at::Tensor& positions, const at::Tensor& cos,
                  const at::Tensor& sin);
void set_force_scalar_elementwise(bool on);

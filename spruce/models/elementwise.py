"""The layer's elementwise steps -- RMSNorm (with the residual add), SiLU-and-mul, rotary embedding
-- in torch, or fused in one native pass each on CPU (spruce/csrc/fused_ops.cpp).

In bf16 on CPU torch runs each step as several passes with an upcast, a rounding and a new tensor
per op; profiling W1 put these steps at about half of the step time, ahead of the GEMMs. The
native ops round where the torch sequence rounds, so results agree with it to a bf16 rounding.
Autograd, other devices and dtypes, and unit-stride-less inputs take the torch path.

The model holds one of these and passes it to its layers, like the linear op and the attention
backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's RMSNorm as transformers rounds it: in reduced precision the normalised x is rounded
    to the model dtype before scaling by the weight, which keeps bf16 outputs bit-compatible."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


class TorchElementwise:
    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual). The native op updates `residual` in place."""
        residual = x + residual
        return rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope(self, qk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
        """qk [T, heads, D] rotated by the tables' rows at `positions` (tables [max_len, D]; `sin`
        carries rotate_half's sign, so rotating is swapping the halves). May work in place."""
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        half = qk.shape[-1] // 2
        return torch.addcmul(qk * c, torch.cat((qk[..., half:], qk[..., :half]), -1), s)


class NativeElementwise(TorchElementwise):
    name = "native-cpu"

    def __init__(self, ops):
        self.ops = ops

    @staticmethod
    def _native(*ts: torch.Tensor) -> bool:
        t = ts[0]
        return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)
                and all(u.dtype == t.dtype and u.stride(-1) == 1 for u in ts)
                and not (torch.is_grad_enabled() and any(u.requires_grad for u in ts)))

    def rms_norm(self, x, weight, eps):
        if x.dim() != 2 or not self._native(x, weight):
            return super().rms_norm(x, weight, eps)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.ops.rms_norm(out, x, weight, eps)
        return out

    def add_rms_norm(self, x, residual, weight, eps):
        if x.dim() != 2 or residual.shape != x.shape or not self._native(x, residual, weight):
            return super().add_rms_norm(x, residual, weight, eps)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.ops.add_rms_norm(out, residual, x, weight, eps)
        return out, residual

    def silu_and_mul(self, gate_up):
        if gate_up.dim() != 2 or not self._native(gate_up):
            return super().silu_and_mul(gate_up)
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
        self.ops.silu_and_mul(out, gate_up)
        return out

    def rope(self, qk, positions, cos, sin):
        if (qk.dim() != 3 or positions.dtype != torch.int64 or not positions.is_contiguous()
                or not self._native(qk, cos, sin)):
            return super().rope(qk, positions, cos, sin)
        self.ops.rope_inplace(qk, positions, cos, sin)
        return qk


def get_elementwise(device, dtype: torch.dtype) -> TorchElementwise:
    """The native ops on CPU in fp32/bf16 when they are built (SPRUCE_ELEMENTWISE_BACKEND=torch|native
    forces a choice), else torch."""
    from spruce.attention._build import cpu_ops_for
    ops = cpu_ops_for("SPRUCE_ELEMENTWISE_BACKEND", device, dtype, needs="silu_and_mul")
    return TorchElementwise() if ops is None else NativeElementwise(ops)

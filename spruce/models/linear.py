"""How a model's linear layers run: torch's F.linear, or the native skinny GEMM for few rows.

Decode-sized batches (a few to ~100 rows) are bound by streaming the weights from memory, and
there MKL's fp32 sgemm reaches about half the machine's bandwidth. The native op
(spruce/csrc/skinny_gemm.cpp) reads every weight row once; on the 2-core dev box it runs
SmolLM2's layers 2x faster at 1 row, 3x at 2-4 rows and 1.6x at 64 rows, and is even at ~100
rows (measured with the weights cold in cache, as in a real forward). Larger batches (prefill
chunks) stay with MKL, which wins once the GEMM is compute-bound. Weights that were loaded from
quantized blocks (spruce/models/quant.py) are read as those blocks at decode sizes: a further
1.6-1.7x at 1-5 rows over the fp32 op, with bit-identical outputs.

The model holds one of these and passes it to its layers, like the attention backend.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from spruce.models.quant import QuantWeight

# Rows up to which the native op beats MKL on this model's shapes (see the module doc).
SKINNY_MAX_ROWS = 96
# In a bf16 model, rows up to which linears read the quantized blocks (SkinnyCPULinear._bf16). Not
# yet tuned: oneDNN's bf16 GEMM runs at ~20 GFLOP/s at 1 row and ~750 at 64 on the AMX dev box.
BF16_QUANT_MAX_ROWS = int(os.environ.get("SPRUCE_BF16_QUANT_MAX_ROWS", "8"))
# In a bf16 model, rows up to which linears run oneDNN on a weight reordered once into its blocked
# layout. F.linear reorders the weight on every call; at decode sizes that is a third to a half of
# the call (SmolLM2's shapes on the AMX dev box: 1.3-2x faster from 2 to 256 rows, mixed at 512).
BF16_PACKED_MAX_ROWS = int(os.environ.get("SPRUCE_BF16_PACKED_MAX_ROWS", "256"))
_PACK_BATCH_HINT = 64   # the batch size oneDNN picks the blocked layout for


class TorchLinear:
    name = "torch"

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, w, b)


class SkinnyCPULinear(TorchLinear):
    """F.linear, except 2-D fp32 inputs of at most `max_rows` rows outside autograd, which run the
    native skinny GEMM -- on a weight's block-quantized copy when one is registered -- and bf16
    inputs of at most BF16_QUANT_MAX_ROWS rows whose weight has such a copy."""
    name = "native-cpu"
    takes_quantized = True

    def __init__(self, ops, max_rows: int = SKINNY_MAX_ROWS):
        self.ops = ops
        self.max_rows = max_rows
        # data_ptr -> (weight, its version when registered, QuantWeight). The version check drops
        # a copy whose weight was written in place since.
        self._quantized: dict[int, tuple[torch.Tensor, int, QuantWeight]] = {}
        # data_ptr -> (weight, version, oneDNN-packed copy); None once packing proved unavailable.
        self._packed: Optional[dict[int, tuple[torch.Tensor, int, torch.Tensor]]] = {}

    def register_quantized(self, w: torch.Tensor, q: QuantWeight) -> None:
        if tuple(q.shape) != tuple(w.shape):
            raise ValueError(f"quantized copy has shape {q.shape}, the weight {tuple(w.shape)}")
        self._quantized[w.data_ptr()] = (w, w._version, q)

    @property
    def num_quantized(self) -> int:
        return len(self._quantized)

    def __call__(self, x, w, b=None):
        if (x.dim() != 2 or x.device.type != "cpu" or x.dtype != w.dtype
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return F.linear(x, w, b)
        if x.dtype == torch.bfloat16:
            return self._bf16(x, w, b)
        if (x.shape[0] > self.max_rows or x.dtype != torch.float32 or x.stride(-1) != 1
                or not w.is_contiguous()):
            return F.linear(x, w, b)
        q = self._quant_copy(w)
        if q is not None:
            return self._quant_linear(x, q, b)
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        self.ops.skinny_linear(out, x, w, b)
        return out

    def _quant_linear(self, x: torch.Tensor, q: QuantWeight, b: Optional[torch.Tensor]) -> torch.Tensor:
        out = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)
        self.ops.quant_linear(out, x, q.format, q.qs, q.scale, q.min, b)
        return out

    def _quant_copy(self, w: torch.Tensor) -> Optional[QuantWeight]:
        entry = self._quantized.get(w.data_ptr())
        if entry is not None and entry[0] is w and entry[1] == w._version:
            return entry[2]
        return None

    def _bf16(self, x, w, b):
        # A bf16 model: oneDNN's bf16 GEMM (AMX / AVX-512 BF16 where the CPU has them) wins from a
        # handful of rows up, but at decode sizes it reads the bf16 weight at a fraction of the
        # machine's bandwidth. There the weight's quantized blocks (a quarter of the bytes) are
        # read instead, in fp32 on the exact dequantized values, and the result rounded to bf16.
        q = self._quant_copy(w) if x.shape[0] <= BF16_QUANT_MAX_ROWS else None
        if q is not None:
            return self._quant_linear(x.float(), q, None if b is None else b.float()).to(torch.bfloat16)
        if x.shape[0] <= BF16_PACKED_MAX_ROWS and x.stride(-1) == 1:
            packed = self._packed_copy(w)
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return F.linear(x, w, b)

    def _packed_copy(self, w: torch.Tensor) -> Optional[torch.Tensor]:
        """w reordered into oneDNN's blocked bf16 layout, made on first use (one more copy of the
        weight's bytes); None where this torch build or CPU cannot."""
        if self._packed is None or not w.is_contiguous():
            return None
        entry = self._packed.get(w.data_ptr())
        if entry is not None and entry[0] is w and entry[1] == w._version:
            return entry[2]
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_BATCH_HINT)
        except (RuntimeError, AttributeError, NotImplementedError):
            self._packed = None
            return None
        self._packed[w.data_ptr()] = (w, w._version, packed)
        return packed


def get_linear(device, dtype: torch.dtype) -> TorchLinear:
    """The native op for fp32 or bf16 on CPU when it is built (SPRUCE_LINEAR_BACKEND=torch|native
    forces a choice), else torch."""
    from spruce.attention._build import cpu_ops_for
    ops = cpu_ops_for("SPRUCE_LINEAR_BACKEND", device, dtype, needs="skinny_linear")
    return TorchLinear() if ops is None else SkinnyCPULinear(ops)

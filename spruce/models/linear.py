"""How a model's linear layers run: torch's F.linear, or the native skinny GEMM for few rows.

Decode-sized batches (a few to ~100 rows) are bound by streaming the weights from memory, and
there MKL's fp32 sgemm reaches about half the machine's bandwidth. The native op
(spruce/csrc/skinny_gemm.cpp) reads every weight row once; on the 2-core dev box it runs
SmolLM2's layers 2x faster at 1 row, 3x at 2-4 rows and 1.6x at 64 rows, and is even at ~100
rows (measured with the weights cold in cache, as in a real forward). Built with AVX-512 it runs
16-lane tiles against up to 6 rows at once: on the Ice Lake VM a whole SmolLM2 forward (Q4_1
blocks, 300 tokens of context) went from 27.8 / 50.9 / 74.8 ms at 1 / 5 / 13 rows to 20.2 / 29.9 /
42.4 (scripts/probe_verify_rows.py), which is what a speculative verify step costs. Larger batches (prefill
chunks) stay with MKL, which wins once the GEMM is compute-bound. Weights that were loaded from
quantized blocks (spruce/models/quant.py) are read as those blocks at decode sizes: a further
1.6-1.7x at 1-5 rows over the fp32 op, with bit-identical outputs.

bf16 models on CPUs with AVX-512 BF16 but no AMX read those blocks at 1-16 rows with bf16 dot
products (spruce/csrc/quant_bf16.cpp): each tile is dequantized once to the model's own bf16
values for all rows, so the 120 layer linears of SmolLM2 took 5.8 / 9.0 / 10.3 ms at 1 / 5 / 8
rows against oneDNN's 11.3 / 10.5 / 12.4 on the Zen 4 dev box (even at 9-16, 5-13% slower at
24-32), the tied lm_head 1.5 ms against 4.3 at 1 row. Its output rows do not depend on the
batch, which keeps greedy speculation lossless in bf16.

bf16 models on CPUs with AMX run decode-sized batches through the native AMX GEMM
(spruce/csrc/amx_gemm.cpp) on a weight packed once into its tile layout: on the AMX dev box it runs
SmolLM2's layers 1.3-2.5x faster than oneDNN from 9 to 256 rows, and ~3x with the weights cold in
cache as in a real forward, and 1.1-2x faster than reading the quantized blocks at 1-8 rows. The
tied lm_head (49152 columns) above 32 rows is the exception, where oneDNN's blocking wins by
~10-20%.

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
# In a bf16 model without AMX, rows up to which linears read the quantized blocks
# (SkinnyCPULinear._bf16). On the Zen 4 dev box (AVX-512 BF16), SmolLM2's 120 layer linears took
# 6.3 / 7.2 / 9.0 / 13.6 / 17.5 ms at 1 / 2 / 3 / 5 / 8 rows that way against oneDNN's
# 11.1 / 11.7 / 9.9 / 10.3 / 11.3 ms: the blocks' fp32 FMAs become the bound from 4 rows on.
BF16_QUANT_MAX_ROWS = int(os.environ.get("SPRUCE_BF16_QUANT_MAX_ROWS", "3"))
# Where the native ops have quant_linear_bf16 (AVX-512 BF16 dot products on the blocks, each tile
# dequantized once for all rows), rows up to which it runs instead (see _bf16). Its rows do not
# depend on the batch, so up to here a speculative step gives the same greedy tokens as plain
# decoding. It is even with oneDNN at 9-16 rows and slower above: 5-13% at 24-32 rows in
# isolation, and W3 at 2 req/s (17-32 requests decoding) lost ~30% of its TPOT ratio to vLLM with
# the limit at 32. SPRUCE_BF16_QUANT_DOT_MAX_ROWS=32 makes SpecInfer's 21-node tree at batch 1
# bit-exact in bf16 at that cost.
BF16_QUANT_DOT_MAX_ROWS = int(os.environ.get("SPRUCE_BF16_QUANT_DOT_MAX_ROWS", "16"))
# In a bf16 model, rows up to which linears run oneDNN on a weight reordered once into its blocked
# layout. F.linear reorders the weight on every call; at decode sizes that is a third to a half of
# the call (SmolLM2's shapes on the AMX dev box: 1.3-2x faster from 2 to 256 rows, mixed at 512).
BF16_PACKED_MAX_ROWS = int(os.environ.get("SPRUCE_BF16_PACKED_MAX_ROWS", "256"))
_PACK_BATCH_HINT = 64   # the batch size oneDNN picks the blocked layout for
# Above this many rows, weights with more than AMX_WIDE_COLUMNS outputs (an lm_head) go to oneDNN.
AMX_WIDE_MAX_ROWS = 32
AMX_WIDE_COLUMNS = 8192


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
        # (layout, data_ptr) -> (weight, version, copy in that layout), layout "onednn" or "amx";
        # a layout that proved unavailable is in _no_layout.
        self._packed: dict[tuple[str, int], tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._no_layout: set[str] = set()
        if not getattr(ops, "amx_available", lambda: False)():
            self._no_layout.add("amx")
        self._dot_rows = BF16_QUANT_DOT_MAX_ROWS if getattr(ops, "quant_bf16_available", lambda: False)() else 0

    def register_quantized(self, w: torch.Tensor, q: QuantWeight) -> bool:
        """Keep q to read in place of w at decode sizes; False (and q not kept, saving its bytes)
        where w is bf16 of a shape the AMX GEMM takes, which is faster (see _bf16)."""
        if tuple(q.shape) != tuple(w.shape):
            raise ValueError(f"quantized copy has shape {q.shape}, the weight {tuple(w.shape)}")
        if w.dtype == torch.bfloat16 and "amx" not in self._no_layout and self._amx_shape(*w.shape):
            return False
        self._quantized[w.data_ptr()] = (w, w._version, q)
        return True

    def quantized(self, w: torch.Tensor) -> Optional[QuantWeight]:
        """The block copy registered for w, if any (a drafter selects rows of the target's head)."""
        return self._quant_copy(w)

    @staticmethod
    def _amx_shape(n: int, k: int) -> bool:
        return n % 16 == 0 and k % 32 == 0

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
        # A bf16 model. Where the CPU has AMX, the native AMX GEMM wins at every decode size, also
        # over the quantized blocks (1.1-2x at 1-8 rows on SmolLM2's shapes, weights cold). Else
        # oneDNN's bf16 GEMM reads the bf16 weight at a fraction of the machine's bandwidth at
        # decode sizes, so the weight's quantized blocks (a quarter of the bytes) are read
        # instead: with bf16 dot products up to _dot_rows where the native ops have them, else
        # in fp32 on the exact dequantized values up to BF16_QUANT_MAX_ROWS, rounded to bf16.
        m, (n, k) = x.shape[0], w.shape
        packed_rows = m <= BF16_PACKED_MAX_ROWS and x.stride(-1) == 1
        if (packed_rows and self._amx_shape(n, k)
                and (n <= AMX_WIDE_COLUMNS or m <= AMX_WIDE_MAX_ROWS)):
            packed = self._packed_copy(w, "amx")
            if packed is not None:
                out = torch.empty(m, n, dtype=torch.bfloat16)
                self.ops.amx_linear(out, x, packed, n, b)
                return out
        q = self._quant_copy(w) if m <= max(BF16_QUANT_MAX_ROWS, self._dot_rows) else None
        if q is not None:
            b32 = None if b is None else b.float()
            if m <= self._dot_rows and x.stride(-1) == 1:
                out = torch.empty(m, n, dtype=torch.bfloat16)
                self.ops.quant_linear_bf16(out, x, q.format, q.qs, q.scale, q.min, b32)
                return out
            if m <= BF16_QUANT_MAX_ROWS:
                return self._quant_linear(x.float(), q, b32).to(torch.bfloat16)
        if packed_rows:
            packed = self._packed_copy(w, "onednn")
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return F.linear(x, w, b)

    def _packed_copy(self, w: torch.Tensor, layout: str) -> Optional[torch.Tensor]:
        """w in `layout` -- oneDNN's blocked bf16 layout or the AMX kernel's tiles -- made on first
        use (one more copy of the weight's bytes); None where this build or CPU cannot."""
        if layout in self._no_layout or not w.is_contiguous():
            return None
        key = (layout, w.data_ptr())
        entry = self._packed.get(key)
        if entry is not None and entry[0] is w and entry[1] == w._version:
            return entry[2]
        try:
            if layout == "amx":
                packed = self.ops.amx_pack_weight(w)
            else:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_BATCH_HINT)
        except (RuntimeError, AttributeError, NotImplementedError):
            self._no_layout.add(layout)
            return None
        self._packed[key] = (w, w._version, packed)
        return packed


def get_linear(device, dtype: torch.dtype) -> TorchLinear:
    """The native op for fp32 or bf16 on CPU when it is built (SPRUCE_LINEAR_BACKEND=torch|native
    forces a choice), else torch."""
    from spruce.attention._build import cpu_ops_for
    ops = cpu_ops_for("SPRUCE_LINEAR_BACKEND", device, dtype, needs="skinny_linear")
    return TorchLinear() if ops is None else SkinnyCPULinear(ops)

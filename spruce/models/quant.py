"""Block-quantized copies of linear weights that came quantized (GGUF Q4_1 / Q8_0).

The default model ships as a GGUF whose linears are Q4_1 and whose embedding/head is Q8_0. The
loader dequantizes them to the model's fp32 weights, and it also keeps the blocks, repacked for
the native `quant_linear` op: decode-sized linears then read 5-6 bits a weight instead of 32,
and since the op dequantizes each value exactly as the loader did (d*q is exact in fp32, then
one rounding for + m), their outputs are bit-identical to the fp32 path's. Prefill-sized
linears keep using the fp32 weight (MKL), where compute, not memory, is the bound.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

Q4_1, Q8_0 = 0, 1      # quant_linear's format codes
BLOCK = 32
_GGML_Q4_1, _GGML_Q8_0 = 3, 8   # GGMLQuantizationType values


@dataclass
class QuantWeight:
    """[n, k] weight as blocks of 32 along k. Q4_1: qs uint8 [n, k/2] (per block: low nibbles are
    values 0-15, high nibbles 16-31), scale and min fp32 [n, k/32]; Q8_0: qs int8 [n, k], scale."""
    format: int
    qs: torch.Tensor
    scale: torch.Tensor
    min: Optional[torch.Tensor]

    @property
    def shape(self) -> tuple[int, int]:
        n, c = self.qs.shape
        return n, c * 2 if self.format == Q4_1 else c

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantWeight":
        """The same row operation (e.g. a permutation) applied to every per-row tensor."""
        return QuantWeight(self.format, fn(self.qs).contiguous(), fn(self.scale).contiguous(),
                           None if self.min is None else fn(self.min).contiguous())

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight":
        """Row-wise concatenation (fused qkv / gate_up); all parts share a format and k."""
        fmt = parts[0].format
        if any(p.format != fmt or p.shape[1] != parts[0].shape[1] for p in parts):
            raise ValueError("QuantWeight.cat needs parts of one format and width")
        return QuantWeight(fmt, torch.cat([p.qs for p in parts]), torch.cat([p.scale for p in parts]),
                           None if fmt == Q8_0 else torch.cat([p.min for p in parts]))

    def dequantize(self) -> torch.Tensor:
        """fp32 [n, k], with the loader's rounding (for tests and checks)."""
        n, k = self.shape
        if self.format == Q4_1:
            b = self.qs.view(n, k // BLOCK, BLOCK // 2)
            q = torch.cat((b & 0x0F, b >> 4), -1).float()
            return (self.scale[..., None] * q + self.min[..., None]).view(n, k)
        return (self.scale[..., None] * self.qs.view(n, k // BLOCK, BLOCK).float()).view(n, k)


def enabled() -> bool:
    """SPRUCE_QUANT_WEIGHTS=0 turns the quantized decode path off (A/B measurements)."""
    v = os.environ.get("SPRUCE_QUANT_WEIGHTS", "1").lower()
    if v not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"SPRUCE_QUANT_WEIGHTS must be 0 or 1, got {v!r}")
    return v in ("1", "true", "on")


def quantize_q8_0(w: torch.Tensor) -> Optional[QuantWeight]:
    """Blocks of 32 along k with a per-block scale max|x| / 127 (llama.cpp's Q8_0); None where k
    is not a multiple of 32. For small weights made here (a draft head) that decode reads many
    times a step: a quarter of the fp32 bytes."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        return None
    n, k = w.shape
    b = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = b.abs().amax(-1) / 127       # as llama.cpp: values scaled by the fp32 d, d stored as fp16
    qs = torch.where(d[..., None] > 0, b / d[..., None].clamp_min(1e-30), 0).round().clamp(-127, 127)
    return QuantWeight(Q8_0, qs.to(torch.int8).reshape(n, k).contiguous(), d.half().float().contiguous(), None)


def read_as_q8_0(linear, weights) -> int:
    """Have `linear` read each weight as Q8_0 blocks at decode sizes (a weight that already has a
    block copy keeps it). A weight that gets one takes its dequantized values, so every batch
    size computes the same function. Returns how many did; 0 where the op reads no blocks or
    SPRUCE_QUANT_WEIGHTS=0."""
    register = getattr(linear, "register_quantized", None)
    if register is None or not enabled():
        return 0
    done = 0
    for w in weights:
        if w is None or linear.quantized(w) is not None:
            continue
        q = quantize_q8_0(w)
        if q is None:
            continue
        if register(w, q):      # (False: the op reads this weight faster otherwise, e.g. AMX)
            with torch.no_grad():
                w.copy_(q.dequantize().to(w.dtype))
            register(w, q)      # again: the copy bumped w's version
            done += 1
    return done


def select_rows(linear, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """w's `rows` as a new weight (a reduced-vocabulary head), read as the same rows of w's block
    copy where w has one (outputs bit-identical to those rows of the full head), else as Q8_0."""
    sub = w.index_select(0, rows).contiguous()
    q = getattr(linear, "quantized", lambda _: None)(w)
    if q is not None and enabled():
        linear.register_quantized(sub, q.map_rows(lambda t: t.index_select(0, rows)))
    else:
        read_as_q8_0(linear, [sub])
    return sub


def from_gguf_blocks(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> Optional[QuantWeight]:
    """Repack a GGUF tensor's raw bytes; None for types or shapes the op does not take."""
    if len(shape) != 2 or ggml_type not in (_GGML_Q4_1, _GGML_Q8_0) or shape[1] % BLOCK:
        return None
    n, k = shape
    nb = k // BLOCK

    def f16(b: np.ndarray, col: int) -> torch.Tensor:   # the fp16 at bytes [col, col + 2) of each block
        return torch.from_numpy(b[..., col:col + 2].copy().view(np.float16)[..., 0].astype(np.float32))
    if ggml_type == _GGML_Q4_1:
        b = np.asarray(raw).reshape(n, nb, 20)
        qs = np.ascontiguousarray(b[..., 4:]).reshape(n, nb * 16)
        return QuantWeight(Q4_1, torch.from_numpy(qs), f16(b, 0), f16(b, 2))
    b = np.asarray(raw).reshape(n, nb, 34)
    qs = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k)
    return QuantWeight(Q8_0, torch.from_numpy(qs), f16(b, 0), None)

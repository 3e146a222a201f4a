"""Llama-family causal LM over one flat, unpadded token batch with a paged KV cache.

Covers Llama 2/3 (incl. llama3/linear/yarn rope scaling), SmolLM2, Mistral, Qwen2/2.5 (q/k/v
bias) and Qwen3 (per-head q/k RMSNorm). Weights are stored fused (qkv, gate_up) so each layer
runs three big GEMMs plus o_proj; parameters are named after what they hold, and
`load_weights` accepts HuggingFace names and does the fusing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from spruce.attention.backend import AttentionBackend, get_attention_backend
from spruce.attention.metadata import AttentionMetadata
from spruce.models.elementwise import TorchElementwise, get_elementwise
from spruce.models.kv_memory import zeros
from spruce.models.linear import TorchLinear, get_linear
from spruce.models.quant import QuantWeight


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None      # HF rope_parameters/rope_scaling minus rope_theta
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False             # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False                    # per-head RMSNorm on q and k before rope (Qwen3)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    architecture: str = "LlamaForCausalLM"
    # Mistral v0.1's window (4096). Not applied: attention is always full, which differs from
    # the checkpoint only for sequences longer than the window.
    sliding_window: Optional[int] = None

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "LlamaConfig":
        arch = (d.get("architectures") or [None])[0] or {
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(d.get("model_type"), "")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        # transformers 5 nests rope_theta and the scaling inside rope_parameters; older files use
        # rope_theta + rope_scaling at the top level.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        scaling = d.get("rope_scaling") or rope or None
        if scaling is not None:
            scaling = dict(scaling)
            scaling.pop("rope_theta", None)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if rope_type == "default" else scaling | {"rope_type": rope_type}
        heads = d["num_attention_heads"]
        is_qwen2 = arch == "Qwen2ForCausalLM" or d.get("model_type") == "qwen2"
        is_qwen3 = arch == "Qwen3ForCausalLM" or d.get("model_type") == "qwen3"
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2's q/k/v always carry a bias whatever its config says (transformers hardcodes it)
            attention_bias=is_qwen2 or bool(d.get("attention_bias")), qk_norm=is_qwen3,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            architecture=arch,
            sliding_window=d.get("sliding_window") if d.get("use_sliding_window", True) else None)


def allocate_kv_cache(config: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_dim].

    Zeroed, not empty: attention backends may read (masked) padding slots, and 0 * NaN is NaN."""
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [(zeros(shape, dtype, device), zeros(shape, dtype, device)) for _ in range(config.num_hidden_layers)]


def rope_inv_freq(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, cos/sin scale), computed as transformers does."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if not s:
        return inv_freq, 1.0
    kind = s["rope_type"]
    if kind == "freq_factors":   # GGUF rope_freqs tensor (Llama 3.1 files)
        return inv_freq / torch.tensor(s["freq_factors"], dtype=torch.float32), 1.0
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = s.get("original_max_position_embeddings", config.max_position_embeddings)
        factor = s.get("factor") or config.max_position_embeddings / old_len

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        attn = s.get("attention_factor")
        if attn is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def corr_dim(rot):
            return dim * math.log(old_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        pos = base ** (torch.arange(0, dim, 2).float() / dim)
        extra = 1 - ramp
        return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra, float(attn)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, yarn)")


class LlamaLayer(nn.Module):
    def __init__(self, c: LlamaConfig, dtype: torch.dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        h, d = c.hidden_size, c.head_dim
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, d
        self.q_size, self.kv_size = self.nh * d, self.nkv * d
        self.eps = c.rms_norm_eps
        self.input_norm = nn.Parameter(torch.empty(h, **kw))
        self.qkv_proj = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, h, **kw))
        self.qkv_bias = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, **kw)) if c.attention_bias else None
        # Qwen3: q_norm weight repeated over q heads then k_norm over kv heads, so one multiply
        # normalises the roped q and k rows together.
        self.qk_norm = nn.Parameter(torch.empty(self.nh + self.nkv, d, **kw)) if c.qk_norm else None
        self.o_proj = nn.Parameter(torch.empty(h, self.q_size, **kw))
        self.post_norm = nn.Parameter(torch.empty(h, **kw))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * c.intermediate_size, h, **kw))
        self.down_proj = nn.Parameter(torch.empty(h, c.intermediate_size, **kw))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], positions: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], kv_cache: tuple[torch.Tensor, torch.Tensor],
                md: AttentionMetadata, backend: AttentionBackend, linear: TorchLinear,
                ew: TorchElementwise) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the residual add is left to
        the next norm, which fuses it. residual=None for the first layer (x is the stream)."""
        t = x.shape[0]
        if residual is None:
            h, residual = ew.rms_norm(x, self.input_norm, self.eps), x
        else:
            h, residual = ew.add_rms_norm(x, residual, self.input_norm, self.eps)
        qkv = linear(h, self.qkv_proj, self.qkv_bias)
        qk = qkv[:, :self.q_size + self.kv_size].view(t, self.nh + self.nkv, self.hd)
        if self.qk_norm is not None:
            qk = F.rms_norm(qk, (self.hd,), None, self.eps) * self.qk_norm
        qk = ew.rope(qk, positions, *rope)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.nkv, self.hd)
        o = backend.forward(qk[:, :self.nh], qk[:, self.nh:], v, kv_cache[0], kv_cache[1], md,
                            self.hd ** -0.5)
        h, residual = ew.add_rms_norm(linear(o.reshape(t, self.q_size), self.o_proj), residual,
                                      self.post_norm, self.eps)
        return linear(ew.silu_and_mul(linear(h, self.gate_up_proj)), self.down_proj), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: torch.dtype = torch.float32, device="cpu",
                 max_model_len: Optional[int] = None, backend: Optional[AttentionBackend] = None,
                 linear: Optional[TorchLinear] = None, elementwise: Optional[TorchElementwise] = None):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, device=device)
        self.embed_tokens = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, **kw))
        self.layers = nn.ModuleList(LlamaLayer(config, dtype, device) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(config.hidden_size, **kw))
        self.lm_head = None if config.tie_word_embeddings else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, **kw))
        self.backend = backend or get_attention_backend(device)
        self.linear = linear or get_linear(device, dtype)
        self.elementwise = elementwise or get_elementwise(device, dtype)
        self.max_model_len = max_model_len or config.max_position_embeddings
        inv_freq, attn_scale = rope_inv_freq(config)
        freqs = torch.arange(self.max_model_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos() * attn_scale, freqs.sin() * attn_scale
        # [max_len, D], cast to the model dtype as transformers does before applying.
        self.register_buffer("rope_cos", torch.cat((cos, cos), -1).to(**kw), persistent=False)
        self.register_buffer("rope_sin", torch.cat((-sin, sin), -1).to(**kw), persistent=False)
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Flat batch -> final-normed hidden states [T, hidden] (feed selected rows to compute_logits)."""
        x, residual = F.embedding(input_ids, self.embed_tokens), None
        positions = positions.contiguous()
        rope, ew = (self.rope_cos, self.rope_sin), self.elementwise
        self.backend.prepare(attn_metadata)
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, rope, kv, attn_metadata, self.backend,
                                self.linear, ew)
        if residual is None:
            return ew.rms_norm(x, self.norm, self.config.rms_norm_eps)
        return ew.add_rms_norm(x, residual, self.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return self.linear(hidden, w).float()

    # ---- weights -------------------------------------------------------------------------------

    def _slot(self, name: str) -> tuple[torch.Tensor, Optional[slice], str]:
        """HF parameter name -> (our tensor, row slice inside it or None, our name)."""
        c = self.config
        if name == "model.embed_tokens.weight":
            return self.embed_tokens, None, "embed_tokens"
        if name == "model.norm.weight":
            return self.norm, None, "norm"
        if name == "lm_head.weight":
            if self.lm_head is None:
                return self.embed_tokens, None, "lm_head(tied)"
            return self.lm_head, None, "lm_head"
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or len(parts) < 5:
            raise KeyError(name)
        i, rest = int(parts[2]), ".".join(parts[3:])
        if not 0 <= i < len(self.layers):
            raise KeyError(name)
        layer, pre = self.layers[i], f"layers.{i}."
        q, kv = layer.q_size, layer.kv_size
        qkv_rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
        inter = c.intermediate_size
        table = {
            "input_layernorm.weight": (layer.input_norm, None, "input_norm"),
            "post_attention_layernorm.weight": (layer.post_norm, None, "post_norm"),
            "self_attn.o_proj.weight": (layer.o_proj, None, "o_proj"),
            "mlp.gate_proj.weight": (layer.gate_up_proj, slice(0, inter), "gate_up_proj[gate]"),
            "mlp.up_proj.weight": (layer.gate_up_proj, slice(inter, 2 * inter), "gate_up_proj[up]"),
            "mlp.down_proj.weight": (layer.down_proj, None, "down_proj"),
        }
        for p, rows in qkv_rows.items():
            table[f"self_attn.{p}_proj.weight"] = (layer.qkv_proj, rows, f"qkv_proj[{p}]")
            if layer.qkv_bias is not None:
                table[f"self_attn.{p}_proj.bias"] = (layer.qkv_bias, rows, f"qkv_bias[{p}]")
        if layer.qk_norm is not None:
            table["self_attn.q_norm.weight"] = (layer.qk_norm, slice(0, layer.nh), "qk_norm[q]")
            table["self_attn.k_norm.weight"] = (layer.qk_norm, slice(layer.nh, layer.nh + layer.nkv), "qk_norm[k]")
        if rest not in table:
            raise KeyError(name)
        t, rows, ours = table[rest]
        return t, rows, pre + ours

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Copy (HF name, tensor) pairs into the fused parameters; returns the names filled.

        Raises on unknown names, shape mismatches and (strict) anything left unloaded."""
        loaded: set[str] = set()
        with torch.no_grad():
            for name, w in weights:
                if "rotary_emb.inv_freq" in name:
                    continue
                try:
                    dst, rows, ours = self._slot(name)
                except KeyError:
                    raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}") from None
                if ours == "lm_head(tied)":
                    continue   # some tied checkpoints still ship a copy of the embedding
                target = dst if rows is None else dst[rows]
                if ours.endswith("qk_norm[q]") or ours.endswith("qk_norm[k]"):
                    w = w.reshape(1, -1).expand(target.shape[0], -1)
                if tuple(target.shape) != tuple(w.shape):
                    raise ValueError(f"weight {name!r} has shape {tuple(w.shape)}, expected {tuple(target.shape)}")
                target.copy_(w)
                loaded.add(ours)
        if strict:
            missing = sorted(set(self.expected_weights()) - loaded)
            if missing:
                raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")
        return loaded

    def attach_quantized(self, blocks: dict[str, QuantWeight]) -> int:
        """Hand the linear op block-quantized copies of weights (HF name -> QuantWeight, e.g. a
        GGUF's own blocks). A fused parameter gets one only when every piece of it has one, of
        one format. Returns how many parameters got one."""
        register = getattr(self.linear, "register_quantized", None)
        if register is None:
            return 0
        pieces: dict[int, list] = {}
        for name, q in blocks.items():
            try:
                dst, rows, _ = self._slot(name)
            except KeyError:
                raise ValueError(f"quantized weight for unknown parameter {name!r}") from None
            if dst.dim() == 2:
                pieces.setdefault(id(dst), [dst]).append((rows.start if rows else 0, q))
        done = 0
        for dst, *parts in pieces.values():
            parts.sort(key=lambda p: p[0])
            if len({p.format for _, p in parts}) != 1:
                continue
            q = QuantWeight.cat([p for _, p in parts]) if len(parts) > 1 else parts[0][1]
            if q.shape == tuple(dst.shape) and register(dst, q):   # every row covered
                done += 1
        return done

    def expected_weights(self) -> list[str]:
        names = ["embed_tokens", "norm"] + ([] if self.lm_head is None else ["lm_head"])
        for i, layer in enumerate(self.layers):
            pre = f"layers.{i}."
            names += [pre + n for n in ("input_norm", "post_norm", "o_proj", "down_proj",
                                        "gate_up_proj[gate]", "gate_up_proj[up]",
                                        "qkv_proj[q]", "qkv_proj[k]", "qkv_proj[v]")]
            if layer.qkv_bias is not None:
                names += [pre + f"qkv_bias[{p}]" for p in "qkv"]
            if layer.qk_norm is not None:
                names += [pre + "qk_norm[q]", pre + "qk_norm[k]"]
        return names

    def init_random_(self, seed: int = 0, std: float = 0.02) -> "LlamaForCausalLM":
        """Random weights (for shape-only benchmarks): normal matrices, unit norms."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1 or name.endswith("norm"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

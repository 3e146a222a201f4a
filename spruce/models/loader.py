"""Load a ResolvedModel (HF safetensors directory or GGUF file) into a LlamaForCausalLM.

GGUF: the header is parsed here (gguf.GGUFReader builds a numpy view per array element and takes
seconds on a 49k-token vocabulary); tensor bytes are memory-mapped and dequantized with
`gguf.quants.dequantize`, so every type the gguf package knows (F32, F16, BF16, Q4_0/1, Q8_0,
K-quants, IQ*) loads as dense weights in the requested dtype.
"""
from __future__ import annotations

import functools
import json
import mmap
import re
import struct
import sys
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from spruce.models import quant
from spruce.models.llama import LlamaConfig, LlamaForCausalLM
from spruce.models.registry import GGUF_ARCHITECTURES, get_model_class
from spruce.models.resolve import ResolvedModel

# ---- GGUF parsing ---------------------------------------------------------------------------------

# GGUFValueType -> struct format; 8 = string, 9 = array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class GGUFTensorInfo:
    name: str
    qtype: int          # gguf.GGMLQuantizationType value
    shape: tuple        # numpy order (outermost first), i.e. GGUF dims reversed
    offset: int         # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, kind: int):
        fmt = "<" + _SCALAR[kind]
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar(10)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.scalar(4), self.scalar(10)
            if item in _NP:   # numeric arrays in one go
                arr = np.frombuffer(self.buf, dtype=np.dtype(_NP[item]).newbyteorder("<"), count=n,
                                    offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(item) for _ in range(n)]
        return self.scalar(kind)


def _parse_gguf(path: Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    import gguf
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.scalar(4)
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian file?)")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar(4))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar(10) for _ in range(cur.scalar(4))]
            raw.append((name, dims, cur.scalar(4), cur.scalar(10)))
        align = int(meta.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
    finally:
        buf.close()
    tensors = []
    for name, dims, qtype, off in raw:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
        tensors.append(GGUFTensorInfo(name, qtype, tuple(reversed(dims)), data_start + off, nbytes))
    return meta, tensors


@functools.lru_cache(maxsize=4)
def _parse_gguf_cached(path: str, mtime: float):
    return _parse_gguf(Path(path))


def load_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All GGUF key/values (tokenizer arrays as lists), e.g. for the tokenizer. Cached per file."""
    p = Path(path)
    return dict(_parse_gguf_cached(str(p.resolve()), p.stat().st_mtime)[0])


def _dequantize(data: np.memmap, t: GGUFTensorInfo) -> torch.Tensor:
    import gguf
    qt = gguf.GGMLQuantizationType(t.qtype)
    raw = data[t.offset:t.offset + t.nbytes]
    if qt == gguf.GGMLQuantizationType.F64:
        arr = raw.view(np.float64).reshape(t.shape)
    else:
        try:
            arr = gguf.quants.dequantize(raw.reshape(gguf.quants.quant_shape_to_byte_shape(t.shape, qt)), qt)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor {t.name!r} has type {qt.name}, which the installed gguf "
                             "package cannot dequantize") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # read-only mmap view: we only read it
        return torch.from_numpy(np.ascontiguousarray(arr))


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute` (interleaved-pair rope -> HF half rope)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}"
    return None


def gguf_config(meta: dict[str, Any], tensor_names: set[str]) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        get_model_class(str(arch))   # raises the uniform "unsupported architecture" error
    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    hf_arch = GGUF_ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        hf_arch = "MistralForCausalLM"
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])) or None
    scaling = None
    kind = key("rope.scaling.type")
    if kind and kind != "none":
        scaling = {"rope_type": kind, "factor": key("rope.scaling.factor", 1.0)}
        if key("rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"), num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv") or heads,
        head_dim=key("attention.key_length") or hidden // heads,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=key("context_length", 2048),
        # llama.cpp writes output.weight only when the head is not the embedding matrix
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"), architecture=hf_arch)


def _load_gguf(path: Path, dtype, device, max_model_len) -> tuple[LlamaForCausalLM, LlamaConfig]:
    p = path.resolve()
    meta, tensors = _parse_gguf_cached(str(p), p.stat().st_mtime)
    by_name = {t.name: t for t in tensors}
    config = gguf_config(meta, set(by_name))
    data = np.memmap(p, dtype=np.uint8, mode="r")
    if "rope_freqs.weight" in by_name:
        # Llama 3.1-style GGUFs carry the per-frequency rope divisors as a tensor.
        config.rope_scaling = {"rope_type": "freq_factors",
                               "freq_factors": _dequantize(data, by_name["rope_freqs.weight"]).tolist()}
    if config.vocab_size is None:
        config.vocab_size = by_name["token_embd.weight"].shape[0]
    model = get_model_class(config.architecture)(config, dtype=dtype, device=device, max_model_len=max_model_len)
    # llama.cpp permutes q/k rows only for its "llama" rope layout (llama and mistral files).
    permuted = meta.get("general.architecture") in ("llama", "mistral")
    todo = [t for t in tensors if t.name != "rope_freqs.weight"]
    for t in todo:
        if _hf_name(t.name) is None:
            raise ValueError(f"{path.name}: unexpected GGUF tensor {t.name!r}")

    # Quantized linears also keep their blocks when the model's linear op can read them.
    keep_blocks = quant.enabled() and getattr(model.linear, "takes_quantized", False)
    blocks: dict[str, quant.QuantWeight] = {}

    def convert(t: GGUFTensorInfo) -> tuple[str, torch.Tensor]:
        w = _dequantize(data, t)
        q = quant.from_gguf_blocks(data[t.offset:t.offset + t.nbytes], t.qtype, t.shape) if keep_blocks else None
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            n_head = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            w = _unpermute_rows(w, n_head)
            q = q and q.map_rows(lambda r: _unpermute_rows(r, n_head))
        if q is not None:
            blocks[_hf_name(t.name)] = q
        return _hf_name(t.name), w

    model.load_weights(_progress(_prefetch(convert, todo), len(todo), f"loading {path.name}"))
    if blocks:
        model.attach_quantized(blocks)
    return model, config


def _prefetch(fn, items, window: int = 4):
    """Ordered map on two threads (numpy dequantization releases the GIL), at most `window`
    results pending so a big model is never held twice in memory."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---- HF directories -------------------------------------------------------------------------------

def _hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        for name in files:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{path} has no *.safetensors (nor pytorch_model*.bin) weights")
    for b in bins:
        yield from torch.load(b, map_location="cpu", weights_only=True).items()


def _count_hf_tensors(path: Path) -> int:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return len(json.loads(index.read_text())["weight_map"])
    return 0


def _load_hf_dir(path: Path, dtype, device, max_model_len) -> tuple[LlamaForCausalLM, LlamaConfig]:
    hf = json.loads((path / "config.json").read_text())
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    cls = get_model_class(arch)
    config = LlamaConfig.from_hf_config(hf)
    gen = path / "generation_config.json"
    if gen.is_file():
        # generate() stops on generation_config's eos ids (Llama 3 lists several there).
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            config.eos_token_id = eos
    model = cls(config, dtype=dtype, device=device, max_model_len=max_model_len)
    model.load_weights(_progress(_hf_weights(path), _count_hf_tensors(path), f"loading {path.name}"))
    return model, config


# ---- entry points ---------------------------------------------------------------------------------

def _progress(it, total: int, desc: str):
    if total < 64:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False,
                mininterval=0.5)


def load_model(resolved: ResolvedModel, dtype: torch.dtype, device="cpu",
               max_model_len: Optional[int] = None) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Build the model on `device` in `dtype` and fill its weights; returns (model, config).

    max_model_len bounds the precomputed rope table (default: the model's context length)."""
    device = torch.device(device)
    if resolved.kind == "gguf":
        model, config = _load_gguf(Path(resolved.path), dtype, device, max_model_len)
    elif resolved.kind == "hf_dir":
        model, config = _load_hf_dir(Path(resolved.path), dtype, device, max_model_len)
    else:
        raise ValueError(f"unknown model kind {resolved.kind!r}")
    return model.eval(), config


@functools.lru_cache(maxsize=None)
def _dtype_auto(device_type: str) -> torch.dtype:
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type != "cpu":
        return torch.float32
    # A decode-sized GEMM: which dtype wins depends on the ISA (AVX-512 BF16/AMX vs AVX2).
    best = {}
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(64, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        torch.nn.functional.linear(x, w)
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            t.append(time.perf_counter() - t0)
        best[dt] = min(t)
    return torch.bfloat16 if best[torch.bfloat16] < 0.8 * best[torch.float32] else torch.float32


def dtype_auto(device="cpu") -> torch.dtype:
    """fp32 or bf16, whichever runs a representative matmul faster here (cached per process).

    bf16 must win clearly (halving weight traffic is worth little if the GEMM itself is slower)."""
    return _dtype_auto(torch.device(device).type)

"""Logits of spruce's Llama-family model vs HuggingFace transformers, through a real paged KV cache."""
import numpy as np
import pytest
import torch

from spruce.models.loader import load_gguf_metadata, load_model
from spruce.models.registry import get_model_class
from spruce.models.resolve import ResolvedModel, resolve_model

from tests.paged_runner import PagedRunner

transformers = pytest.importorskip("transformers")


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def tiny_hf(kind: str, seed: int = 0, rope_scaling: bool = True):
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, attn_implementation="eager")
    if kind == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16} if rope_scaling else None
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0,
                                       rope_scaling=scaling)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, tie_word_embeddings=False, rope_theta=1e6, sliding_window=None)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True, rope_theta=1e6)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    # Defaults give near-zero activations and unit norms / zero biases that hide mistakes.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


PROMPTS = {"a": [5, 17, 33, 2, 90, 41, 8, 8, 60, 11, 3], "b": [7, 1, 64, 29, 30], "c": [12, 70, 13]}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_dir_parity_prefill_decode_chunked(kind, tmp_path):
    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if kind == "mistral" else "1GB")
    if kind == "mistral":   # exercise the sharded (index json) layout
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model, config = load_model(ResolvedModel("hf_dir", tmp_path, kind), torch.float32, "cpu")
    assert config.architecture == type(hf).__name__
    assert get_model_class(config.architecture) is type(model)

    # step 1: three whole prompts in one flat batch; step 2: one decode token each
    run = PagedRunner(model, config)
    out = run.step(PROMPTS)
    for rid, ids in PROMPTS.items():
        close(out[rid], hf_logits(hf, ids))
    nxt = {"a": [44], "b": [3], "c": [95]}
    out = run.step(nxt)
    for rid in PROMPTS:
        close(out[rid][-1], hf_logits(hf, PROMPTS[rid] + nxt[rid])[-1])

    # chunked prefill of "a" (6 + 5 tokens) batched with b's prefill, then with b's decode
    run = PagedRunner(model, config, seed=1)
    a, b = PROMPTS["a"], PROMPTS["b"]
    out1 = run.step({"a": a[:6], "b": b})
    out2 = run.step({"b": [3], "a": a[6:]})
    ref_a = hf_logits(hf, a)
    close(torch.cat([out1["a"], out2["a"]]), ref_a)
    close(out2["b"][-1], hf_logits(hf, b + [3])[-1])


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf, arch: str, path):
    """A GGUF as llama.cpp's converter lays it out (permuted q/k for llama, Q4_1 attention and
    Q8_0 FFN weights, like the default model's file).

    Returns the HF state with the quantization round trip applied, to load back into the oracle."""
    import gguf
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm"}
    state = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        arr = t.float().numpy()
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            mod, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{i}.{per_layer[mod]}.{kind}"
        else:
            gname = names[name]
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            n = c.num_attention_heads if ".attn_q." in gname else c.num_key_value_heads
            arr = _llama_cpp_permute(arr, n)
        qtype = (gguf.GGMLQuantizationType.Q8_0 if "ffn_" in gname else gguf.GGMLQuantizationType.Q4_1
                 if ".attn_" in gname and "norm" not in gname else None)
        if qtype is not None and arr.ndim == 2:
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
            deq = gguf.quants.dequantize(q, qtype)
            if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):  # back to HF's row order
                n = c.num_attention_heads if ".attn_q." in gname else c.num_key_value_heads
                deq = deq.reshape(n, deq.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(deq.shape)
            state[name] = torch.from_numpy(np.ascontiguousarray(deq))
        elif arr.ndim == 1:
            w.add_tensor(gname, arr)
        else:
            w.add_tensor(gname, arr.astype(np.float16))
            state[name] = t.half().float()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_gguf_loader_tiny(kind, tmp_path, ops):
    hf = tiny_hf(kind, seed=3, rope_scaling=False)   # GGUF here carries no rope scaling keys
    path = tmp_path / f"tiny-{kind}.gguf"
    state = _write_gguf(hf, kind, path)
    hf.load_state_dict(state, strict=False)
    model, config = load_model(ResolvedModel("gguf", path, "tiny"), torch.float32, "cpu")
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert config.attention_bias == (kind == "qwen2") and config.qk_norm == (kind == "qwen3")
    assert load_gguf_metadata(path)["general.architecture"] == kind
    # The linear op got the file's blocks for every projection (fused qkv from three Q4_1
    # tensors, gate_up from two Q8_0), and reading them gives bit-identical logits.
    assert model.linear.num_quantized == 4 * config.num_hidden_layers
    chunks = {"a": PROMPTS["a"], "c": PROMPTS["c"]}
    out = PagedRunner(model, config).step(chunks)
    close(out["a"], hf_logits(hf, PROMPTS["a"]))
    close(out["c"], hf_logits(hf, PROMPTS["c"]))
    model.linear._quantized.clear()
    fp32 = PagedRunner(model, config).step(chunks)
    assert all(torch.equal(out[r], fp32[r]) for r in chunks)


def test_unsupported_architecture_is_clear():
    with pytest.raises(ValueError, match="supported: .*LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")


# ---- the real default model -------------------------------------------------------------------------

PARIS_PROMPT = [504, 3575, 282, 4649, 314]     # "The capital of France is" (SmolLM2 tokenizer)
PARIS = 7042                                    # " Paris"


@pytest.fixture(scope="module")
def smollm2():
    try:
        resolved = resolve_model("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return resolved, *load_model(resolved, torch.float32, "cpu")


def test_smollm2_loads_and_knows_paris(smollm2):
    _, model, config = smollm2
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.eos_token_id == 2
    run = PagedRunner(model, config, num_blocks=16)
    out = run.step({"p": PARIS_PROMPT})["p"]
    assert out[-1].argmax().item() == PARIS
    if model.linear.name == "native-cpu":   # every Q4_1 projection and the Q8_0 embedding/head
        assert model.linear.num_quantized == 4 * 30 + 1


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf(smollm2):
    """Oracle: transformers' own GGUF conversion (dequantize + reverse q/k permutation).

    from_pretrained(gguf_file=...) needs `accelerate`; load_gguf_checkpoint is the same conversion."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    resolved, model, config = smollm2
    parsed = load_gguf_checkpoint(str(resolved.path))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**parsed["config"])).float().eval()
    tensors = load_gguf_checkpoint(str(resolved.path), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict(tensors, strict=False)
    hf.tie_weights()
    prompt = [1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230]
    out = PagedRunner(model, config, num_blocks=16).step({"p": prompt})["p"]
    torch.testing.assert_close(out, hf_logits(hf, prompt), rtol=1e-3, atol=1e-3)


def test_bf16_model_tracks_fp32(tmp_path):
    hf = tiny_hf("qwen3", seed=5)
    hf.save_pretrained(tmp_path)
    model, config = load_model(ResolvedModel("hf_dir", tmp_path, "q3"), torch.bfloat16, "cpu")
    assert model.dtype == torch.bfloat16
    run = PagedRunner(model, config)
    out = run.step({"a": PROMPTS["a"], "b": PROMPTS["b"]})
    out2 = run.step({"a": [44], "b": [3]})
    torch.testing.assert_close(out["a"], hf_logits(hf, PROMPTS["a"]), rtol=0.05, atol=0.15)
    torch.testing.assert_close(out2["b"][-1], hf_logits(hf, PROMPTS["b"] + [3])[-1], rtol=0.05, atol=0.15)

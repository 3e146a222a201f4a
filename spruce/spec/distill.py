"""`spruce distill`: train a small draft model for a target by distillation, on this CPU.

    spruce distill --target smollm2-135m --out drafts/smollm2-draft

1. Text. The target (Spruce's own offline engine, batched, sampled) answers the chat prompts
   shipped in spruce/spec/data/distill_prompts.jsonl (chat, code, editing, summarizing; none
   from the W4 benchmark), and returns for every generated position its top-20 raw logprobs:
   the teacher distribution, at no extra cost.
2. Draft. A Llama with the target's shapes and `--layers` layers (default 2), initialised from
   target layers (default: the first and the last), the target's final norm, and the target's
   embeddings, frozen and reused as the (tied) head. Optionally (`--draft-vocab K`, default
   8192) the head covers only the K tokens with most teacher mass (FR-Spec / EAGLE-3): the head
   is most of a small draft's cost, and acceptance stays exact because q is 0 elsewhere.
3. Training. Plain PyTorch, fp32, AdamW: cross-entropy from the draft to the teacher's top-k
   distribution (renormalised over the draft's vocabulary) at every generated position, i.e.
   forward KL up to a constant; a held-out 5% reports top-1 agreement with the target.
4. Checkpoint. An HF-format directory the loader reads and `--speculative-config
   '{"method":"draft_model","model":DIR}'` takes: config.json (+ a `spruce_draft` section
   naming the target), model.safetensors (+ index), draft_vocab.json when the head is
   reduced, and the target's tokenizer (tokenizer.json, tokenizer_config.json,
   generation_config.json) so the draft's vocabulary check passes.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from spruce.models.elementwise import rms_norm
from spruce.models.llama import LlamaConfig, LlamaForCausalLM
from spruce.spec.distill_data import Sample, choose_draft_vocab, generate_corpus, load_prompts
from spruce.spec.draft_checkpoint import CORPUS_PROMPT_TAIL, DRAFT_CONFIG_KEY, save_corpus, save_draft_vocab

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


# ---------------------------------------------------------------------------------------------
# The draft model


def make_draft(target: LlamaForCausalLM, num_layers: int = 2,
               init_layers: Optional[Sequence[int]] = None, seed: int = 0) -> LlamaForCausalLM:
    """A `num_layers`-layer fp32 Llama with the target's shapes, embeddings, head and final norm.
    Layers are copies of the target's `init_layers` (default: first and last, then evenly
    spaced); init_layers=[] gives random layers instead."""
    tc = target.config
    n = tc.num_hidden_layers
    if init_layers is None:
        init_layers = default_init_layers(n, num_layers)
    init_layers = list(init_layers)
    if init_layers and len(init_layers) != num_layers:
        raise ValueError(f"init_layers {init_layers} must name {num_layers} target layers")
    if any(not 0 <= i < n for i in init_layers):
        raise ValueError(f"init_layers {init_layers} out of range for a {n}-layer target")
    cfg = LlamaConfig(**{**tc.__dict__, "num_hidden_layers": num_layers})
    cfg.rope_scaling = tc.rope_scaling
    draft = LlamaForCausalLM(cfg, dtype=torch.float32, device="cpu",
                             max_model_len=target.max_model_len)
    if not init_layers:
        draft.init_random_(seed)
    with torch.no_grad():
        draft.embed_tokens.copy_(target.embed_tokens.float())
        draft.norm.copy_(target.norm.float())
        if draft.lm_head is not None:
            draft.lm_head.copy_(target.lm_head.float())
        for d, i in zip(draft.layers, init_layers):
            d.load_state_dict({k: v.float() for k, v in target.layers[i].state_dict().items()})
    return draft


def default_init_layers(num_target_layers: int, num_layers: int) -> list[int]:
    if num_layers == 1:
        return [0]
    return sorted({round(k * (num_target_layers - 1) / (num_layers - 1)) for k in range(num_layers)})


def dense_forward(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] right-padded token ids -> final-normed hidden [B, T, H], plain causal attention
    (no KV cache; autograd works). The same math as LlamaLayer.forward."""
    b, t = input_ids.shape
    x = F.embedding(input_ids, model.embed_tokens)
    pos = torch.arange(t, device=input_ids.device)
    cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]   # [T, 1, D]
    for layer in model.layers:
        h = rms_norm(x, layer.input_norm, layer.eps)
        qkv = F.linear(h, layer.qkv_proj, layer.qkv_bias)
        qk = qkv[..., :layer.q_size + layer.kv_size].view(b, t, layer.nh + layer.nkv, layer.hd)
        if layer.qk_norm is not None:
            qk = F.rms_norm(qk, (layer.hd,), None, layer.eps) * layer.qk_norm
        half = layer.hd // 2
        qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin
        q = qk[:, :, :layer.nh].transpose(1, 2)
        k = qk[:, :, layer.nh:].transpose(1, 2)
        v = qkv[..., layer.q_size + layer.kv_size:].view(b, t, layer.nkv, layer.hd).transpose(1, 2)
        rep = layer.nh // layer.nkv
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.hd ** -0.5)
        x = x + F.linear(o.transpose(1, 2).reshape(b, t, layer.q_size), layer.o_proj)
        h = rms_norm(x, layer.post_norm, layer.eps)
        gate, up = F.linear(h, layer.gate_up_proj).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, layer.down_proj)
    return rms_norm(x, model.norm, model.config.rms_norm_eps)


def hf_state_dict(model: LlamaForCausalLM, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our fused parameters under HuggingFace Llama names (what load_weights reads back)."""
    c = model.config
    out = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head
    inter = c.intermediate_size
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        q, kv = layer.q_size, layer.kv_size
        out[pre + "input_layernorm.weight"] = layer.input_norm
        out[pre + "post_attention_layernorm.weight"] = layer.post_norm
        for name, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv))):
            out[pre + f"self_attn.{name}_proj.weight"] = layer.qkv_proj[rows]
            if layer.qkv_bias is not None:
                out[pre + f"self_attn.{name}_proj.bias"] = layer.qkv_bias[rows]
        if layer.qk_norm is not None:
            out[pre + "self_attn.q_norm.weight"] = layer.qk_norm[0]
            out[pre + "self_attn.k_norm.weight"] = layer.qk_norm[layer.nh]
        out[pre + "self_attn.o_proj.weight"] = layer.o_proj
        out[pre + "mlp.gate_proj.weight"] = layer.gate_up_proj[:inter]
        out[pre + "mlp.up_proj.weight"] = layer.gate_up_proj[inter:]
        out[pre + "mlp.down_proj.weight"] = layer.down_proj
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def hf_config(c: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    d = {"architectures": [c.architecture], "model_type": _MODEL_TYPES.get(c.architecture, "llama"),
         "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
         "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
         "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
         "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
         "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
         "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
         "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
         "torch_dtype": str(dtype).removeprefix("torch.")}
    if c.rope_scaling:
        d["rope_scaling"] = dict(c.rope_scaling)
    return d


def save_draft(model: LlamaForCausalLM, out_dir, tokenizer, target_name: str,
               draft_vocab: Optional[Sequence[int]] = None, info: Optional[dict] = None,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write the draft as an HF-format directory (see the module doc); returns its path.
    The weights are stored in `dtype`; the engine loads them in its own dtype."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(model.config, dtype)
    cfg[DRAFT_CONFIG_KEY] = {"target": target_name, **(info or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = hf_state_dict(model, dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    # With an index, loaders read only the files it lists.
    total = sum(v.numel() * v.element_size() for v in weights.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total},
         "weight_map": {k: "model.safetensors" for k in weights}}, indent=1))
    save_draft_vocab(out, draft_vocab)
    tokenizer.backend.save(str(out / "tokenizer.json"))
    tc = dict(tokenizer.special_tokens_map)
    if tokenizer.chat_template:
        tc["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": sorted(tokenizer.stop_token_ids)}, indent=2))
    return out


# ---------------------------------------------------------------------------------------------
# Training


def _batches(samples: list[Sample], max_tokens: int, rng: random.Random) -> list[list[Sample]]:
    """Length-sorted buckets of at most max_tokens padded tokens, shuffled."""
    order = sorted(samples, key=lambda s: len(s.tokens))
    out, cur = [], []
    for s in order:
        if cur and (len(cur) + 1) * len(s.tokens) > max_tokens:
            out.append(cur)
            cur = []
        cur.append(s)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def _collate(batch: list[Sample], vocab_index: Optional[torch.Tensor]):
    """-> ids [B, T], rows (flat positions predicting generated tokens), teacher (ids, probs)
    over the draft's vocabulary (reduced indices when vocab_index is given)."""
    t = max(len(s.tokens) for s in batch)
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    rows, tid, tlp = [], [], []
    for b, s in enumerate(batch):
        ids[b, :len(s.tokens)] = torch.tensor(s.tokens)
        o = s.top_ids.shape[0]
        rows.append(b * t + s.prompt_len - 1 + torch.arange(o))
        tid.append(s.top_ids)
        tlp.append(s.top_logprobs)
    k = max(x.shape[1] for x in tid)
    tid = torch.cat([F.pad(x, (0, k - x.shape[1])) for x in tid])
    tlp = torch.cat([F.pad(x, (0, k - x.shape[1]), value=-math.inf) for x in tlp])
    p = tlp.exp()
    if vocab_index is not None:
        tid = vocab_index[tid]
        p = torch.where(tid >= 0, p, torch.zeros_like(p))
        tid = tid.clamp(min=0)
    keep = p.sum(-1) > 0
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-20)
    return ids, torch.cat(rows)[keep], tid[keep], p[keep]


def _head(model: LlamaForCausalLM, vocab: Optional[torch.Tensor]) -> torch.Tensor:
    w = model.embed_tokens if model.lm_head is None else model.lm_head
    return w if vocab is None else w.index_select(0, vocab)


def _loss(model, batch, vocab, vocab_index):
    ids, rows, tid, p = _collate(batch, vocab_index)
    hidden = dense_forward(model, ids).reshape(-1, model.config.hidden_size).index_select(0, rows)
    logq = F.linear(hidden, _head(model, vocab)).log_softmax(-1)
    loss = -(p * logq.gather(1, tid)).sum(-1).mean()
    agree = (logq.argmax(-1) == tid.gather(1, p.argmax(-1, keepdim=True))[:, 0]).float()
    return loss, agree


@torch.no_grad()
def evaluate(model, samples: list[Sample], vocab=None, vocab_index=None, max_tokens: int = 4096) -> float:
    """Top-1 agreement of the draft with the target on the samples' generated positions."""
    if not samples:
        return float("nan")
    hits = n = 0
    for batch in _batches(samples, max_tokens, random.Random(0)):
        _, agree = _loss(model, batch, vocab, vocab_index)
        hits += agree.sum().item()
        n += agree.numel()
    return hits / max(n, 1)


def train(model: LlamaForCausalLM, samples: list[Sample], vocab: Optional[Sequence[int]],
          time_budget_s: float, max_epochs: float = 8.0, max_steps: Optional[int] = None,
          lr: float = 3e-4, batch_tokens: int = 4096, seed: int = 0) -> dict:
    """AdamW on the draft's layers and final norm (embeddings/head stay the target's)."""
    from tqdm import tqdm
    rng = random.Random(seed)
    torch.manual_seed(seed)
    vocab_t = torch.tensor(list(vocab), dtype=torch.long) if vocab is not None else None
    vocab_index = None
    if vocab_t is not None:
        vocab_index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
        vocab_index[vocab_t] = torch.arange(len(vocab_t))
    params = [p for n, p in model.named_parameters() if n.startswith("layers.") or n == "norm"]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    epoch_batches = _batches(samples, batch_tokens, rng)
    total = max_steps or max(1, int(max_epochs * len(epoch_batches)))
    t0, step, ema = time.perf_counter(), 0, None

    def set_lr() -> None:
        # Warm-up, then cosine decay over whichever runs out first: the steps or the time.
        progress = min(1.0, max(step / total, (time.perf_counter() - t0) / time_budget_s))
        warmup = min(1.0, (step + 1) / max(1, total // 20))
        scale = warmup * max(0.05, 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
    bar = tqdm(total=total, desc="distill: training", unit="step", file=sys.stderr)
    model.train()
    try:
        while step < total:
            for batch in epoch_batches:
                if step >= total or time.perf_counter() - t0 > time_budget_s:
                    break
                set_lr()
                loss, agree = _loss(model, batch, vocab_t, vocab_index)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
                bar.set_postfix(loss=f"{ema:.3f}", top1=f"{agree.mean().item():.2f}")
                bar.update(1)
            else:
                epoch_batches = _batches(samples, batch_tokens, rng)
                continue
            break
    finally:
        bar.close()
        model.eval()
        for p in params:
            p.requires_grad_(False)
    return {"steps": step, "train_seconds": round(time.perf_counter() - t0, 1),
            "final_loss": None if ema is None else round(ema, 4)}


# ---------------------------------------------------------------------------------------------
# Entry point


def distill(target: str = "smollm2-135m", out: str = "draft", *, layers: int = 2,
            init_layers: Optional[Sequence[int]] = None, draft_vocab: int = 8192,
            num_prompts: Optional[int] = None, prompts_file: Optional[str] = None,
            max_tokens: int = 256, temperature: float = 0.8, top_logprobs: int = 20,
            time_budget_min: float = 28.0, gen_budget_min: Optional[float] = None,
            max_epochs: float = 10.0, max_steps: Optional[int] = None, lr: float = 1e-3,
            batch_tokens: int = 4096, seed: int = 0, dtype: str = "auto",
            samples_per_prompt: Optional[int] = None, num_threads: Optional[int] = None,
            kv_cache_memory: str = "1GiB", kind: str = "draft_model", _loaded=None, log=print) -> Path:
    """Generate, train, save (see the module doc). Returns the checkpoint directory.
    kind="mlp_speculator" trains spec/mlp_speculator.py's head instead (spec/distill_mlp.py)."""
    if kind not in ("draft_model", "mlp_speculator"):
        raise ValueError(f"kind must be draft_model or mlp_speculator, got {kind!r}")
    if samples_per_prompt is None:
        # The speculator trains in a fraction of the draft's time per token, so it can use twice
        # the text in the same budget (it overfit 4 answers a prompt: top-1 0.83 on its training
        # positions against 0.39 on W4's).
        samples_per_prompt = 8 if kind == "mlp_speculator" else 4
    # The speculator's first answer to each prompt is the greedy one. It drafts from the target's
    # hidden states along the text being generated, and greedy text (W4's) runs into states that
    # sampled text visits less: repetitions, the target's favourite phrasings.
    from spruce.entrypoints.llm import LLM
    t_start = time.perf_counter()
    budget = time_budget_min * 60
    gen_budget = (gen_budget_min * 60) if gen_budget_min is not None else 0.5 * budget
    prompts = load_prompts(prompts_file)
    rng = random.Random(seed)
    rng.shuffle(prompts)
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    if num_threads:
        torch.set_num_threads(num_threads)
    # 64 sequences keep the CPU busy; more would only be preempted as their KV grows.
    llm = LLM(target, _loaded=_loaded, dtype=dtype, kv_cache_memory=kv_cache_memory,
              max_logprobs=max(20, top_logprobs), seed=seed, max_num_seqs=64)
    samples = generate_corpus(llm, prompts, max_tokens, temperature, top_logprobs, seed,
                              time_budget_s=gen_budget, samples_per_prompt=samples_per_prompt,
                              greedy_first=kind == "mlp_speculator")
    if not samples:
        raise RuntimeError("the target generated nothing to distill from")
    n_tok = sum(s.top_ids.shape[0] for s in samples)
    save_corpus(Path(out), [s.tokens[max(0, s.prompt_len - CORPUS_PROMPT_TAIL):] for s in samples])
    log(f"distill: {len(samples)} samples, {n_tok} generated tokens in "
        f"{time.perf_counter() - t_start:.0f}s")
    held = max(1, len(samples) // 20) if len(samples) >= 10 else 0
    rng.shuffle(samples)
    val, train_set = samples[:held], samples[held:]
    tok = llm.tokenizer
    vocab = None
    if draft_vocab and draft_vocab < llm.engine.vocab_size:
        vocab = choose_draft_vocab(train_set, draft_vocab, sorted(tok.stop_token_ids))
    if kind == "mlp_speculator":
        return _distill_speculator(llm, target, out, samples, vocab, n_tok, budget - (time.perf_counter() - t_start) - 15,
                                   max_steps, seed, t_start, log)
    model = make_draft(llm.engine.model, layers, init_layers, seed)
    vocab_t = torch.tensor(vocab) if vocab is not None else None
    vocab_index = None
    if vocab_t is not None:
        vocab_index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
        vocab_index[vocab_t] = torch.arange(len(vocab_t))
    before = evaluate(model, val, vocab_t, vocab_index)
    left = budget - (time.perf_counter() - t_start) - 15   # leave time to evaluate and save
    stats = train(model, train_set, vocab, max(left, 1.0), max_epochs, max_steps, lr, batch_tokens, seed)
    after = evaluate(model, val, vocab_t, vocab_index)
    log(f"distill: held-out top-1 agreement with the target {before:.3f} -> {after:.3f} "
        f"({stats['steps']} steps, {stats['train_seconds']}s)")
    info = {"layers_from_target": list(init_layers) if init_layers is not None
            else default_init_layers(llm.engine.model_config.num_hidden_layers, layers),
            "samples": len(samples), "generated_tokens": n_tok, "draft_vocab": len(vocab) if vocab else None,
            "val_top1_before": _num(before), "val_top1_after": _num(after),
            "total_seconds": round(time.perf_counter() - t_start, 1), **stats}
    path = save_draft(model, out, tok, target, vocab, info)
    log(f"distill: wrote {path} in {time.perf_counter() - t_start:.0f}s; use it with "
        f"--speculative-config '{{\"method\":\"draft_model\",\"model\":\"{path}\"}}'")
    return path


def _distill_speculator(llm, target: str, out: str, samples, vocab, n_tok: int, budget_s: float,
                        max_steps: Optional[int], seed: int, t_start: float, log) -> Path:
    from spruce.spec.distill_mlp import train_speculator
    from spruce.spec.mlp_speculator import save_speculator
    head, stats = train_speculator(llm.engine.model, samples, vocab, max(budget_s, 1.0), max_steps=max_steps,
                                   seed=seed, log=log)
    info = {"samples": len(samples), "generated_tokens": n_tok, "draft_vocab": len(vocab) if vocab else None,
            "total_seconds": round(time.perf_counter() - t_start, 1), **stats}
    path = save_speculator(head, out, llm.tokenizer, target, llm.engine.vocab_size, vocab, info)
    log(f"distill: wrote {path} in {time.perf_counter() - t_start:.0f}s; use it with "
        f"--speculative-config '{{\"method\":\"mlp_speculator\",\"model\":\"{path}\"}}'")
    return path


def add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="smollm2-135m", help="the target model (alias, dir or .gguf)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--kind", default="draft_model", choices=["draft_model", "mlp_speculator"],
                   help="a small draft model, or an MLP speculator on the target's hidden states")
    p.add_argument("--layers", type=int, default=2, help="draft layers")
    p.add_argument("--init-layers", default=None,
                   help="comma list of target layers to initialise from (default: first,last); "
                        "'random' for random layers")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="head over the K most frequent tokens (0: the full vocabulary)")
    p.add_argument("--num-prompts", type=int, default=None, help="default: all packaged prompts")
    p.add_argument("--prompts-file", default=None, help="JSONL of {\"messages\": [...]} (default: packaged)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="answers sampled per prompt (default: 4, or 8 for an mlp_speculator)")
    p.add_argument("--time-budget", type=float, default=28.0, help="minutes, generation + training")
    p.add_argument("--gen-budget", type=float, default=None, help="minutes for generation (default: half)")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="the target's dtype while generating (auto: the faster one here)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch threads (default: all cores; 1 is faster on a busy shared machine)")
    p.set_defaults(func=run)


def run(args) -> int:
    init = None
    if args.init_layers:
        init = [] if args.init_layers == "random" else [int(x) for x in args.init_layers.split(",")]
    distill(args.target, args.out, layers=args.layers, init_layers=init, draft_vocab=args.draft_vocab,
            num_prompts=args.num_prompts, prompts_file=args.prompts_file, max_tokens=args.max_tokens,
            temperature=args.temperature, time_budget_min=args.time_budget, gen_budget_min=args.gen_budget,
            max_epochs=args.epochs, max_steps=args.steps, lr=args.lr, batch_tokens=args.batch_tokens,
            seed=args.seed, dtype=args.dtype, samples_per_prompt=args.samples_per_prompt,
            num_threads=args.num_threads, kind=args.kind, log=lambda m: print(m, file=sys.stderr))
    return 0


def _num(x: float) -> Optional[float]:
    return None if x != x else round(x, 4)   # NaN (no held-out set) is not JSON

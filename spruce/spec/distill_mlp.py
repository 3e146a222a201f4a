"""`spruce distill --kind mlp_speculator`: train spec/mlp_speculator.py's head on the target's
own hidden states.

1. Text: the same target-generated corpus as the draft-model distillation (distill_data.py).
2. Features: one forward of the target (no KV cache) over every sample gives the
   final-normed hidden state h_q at every position q; the target's next-token distribution at
   q is then softmax(h_q · W_head), exactly, so no logprobs need to be kept from generation.
3. Training, unrolled `unroll` drafting steps from every position p, as the head runs at
   inference: s_0 = h_p, s_d = f(s_{d-1}, embed(x_{p+d})), loss = cross-entropy from the target's
   distribution at p+d (over the reduced vocabulary) + `feature_weight` * smooth-L1(s_d, h_{p+d})
   (EAGLE's feature regression, which keeps later steps' inputs in the space f was trained on).
   Samples are split into train and held-out by prompt, so a prompt's other answers never leak.
"""
from __future__ import annotations

import math
import random
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from spruce.spec.distill_data import Sample
from spruce.spec.mlp_speculator import SpeculatorHead


def _autocast():
    """bf16 autocast where bf16 GEMMs are fast here (AVX-512 BF16 / AMX), else plain fp32: on an
    Ice Lake without them, a bf16-autocast training step ran 2.8x slower than fp32."""
    from spruce.models.loader import dtype_auto
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_auto() == torch.bfloat16)


def target_features(model, samples: Sequence[Sample], batch_tokens: int = 8192) -> tuple[torch.Tensor, list[int]]:
    """-> (hidden [sum of sample lengths, H] bf16, each sample's offset into it)."""
    from tqdm import tqdm

    from spruce.spec.distill import _batches, dense_forward
    offsets, total = [], 0
    for s in samples:
        offsets.append(total)
        total += len(s.tokens)
    offset_of = {id(s): o for s, o in zip(samples, offsets)}
    feats = torch.empty(total, model.config.hidden_size, dtype=torch.bfloat16)
    bar = tqdm(total=total, desc="distill: target features", unit="tok", file=sys.stderr)
    with torch.no_grad(), _autocast():
        for batch in _batches(list(samples), batch_tokens, random.Random(0)):
            ids = torch.zeros(len(batch), max(len(s.tokens) for s in batch), dtype=torch.long)
            for b, s in enumerate(batch):
                ids[b, :len(s.tokens)] = torch.tensor(s.tokens)
            hidden = dense_forward(model, ids)
            for b, s in enumerate(batch):
                n, o = len(s.tokens), offset_of[id(s)]
                feats[o:o + n] = hidden[b, :n].to(torch.bfloat16)
                bar.update(n)
    bar.close()
    return feats, offsets


class _Data:
    """Flat tokens and features (of every sample), and the positions p of `samples` (at
    `offsets` in them) whose next token was generated and that have `unroll` tokens after them.
    Prompt positions are left out: every prompt starts with the same chat-template system text,
    which the head memorises (held-out top-1 0.60 with them against 0.39 on W4's greedy text)."""

    def __init__(self, tokens: torch.Tensor, feats: torch.Tensor, samples: Sequence[Sample],
                 offsets: Sequence[int], unroll: int):
        self.tokens, self.feats = tokens, feats
        starts = [torch.arange(o + s.prompt_len - 1, o + len(s.tokens) - unroll) for s, o in zip(samples, offsets)
                  if len(s.tokens) - unroll > s.prompt_len - 1]
        self.starts = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)


def _unrolled_loss(head: SpeculatorHead, data: _Data, p: torch.Tensor, embed: torch.Tensor,
                   head_w: torch.Tensor, unroll: int, feature_weight: float):
    """Mean loss over the batch of start positions `p`, and per-step top-1 agreement."""
    state = data.feats[p].float()
    loss, agree = 0.0, []
    for d in range(1, unroll + 1):
        q = p + d
        target_h = data.feats[q].float()
        with _autocast():
            state = head(state, F.embedding(data.tokens[q], embed))
            logits = F.linear(state, head_w)
            with torch.no_grad():
                teacher = F.linear(target_h, head_w)
        logq = logits.float().log_softmax(-1)
        pt = teacher.float().softmax(-1)
        step = -(pt * logq).sum(-1).mean() + feature_weight * F.smooth_l1_loss(state.float(), target_h)
        loss = loss + step / d          # later steps matter less: they are reached less often
        agree.append((logq.argmax(-1) == pt.argmax(-1)).float().mean().item())
        state = state.float()
    return loss, agree


def split_by_prompt(samples: Sequence[Sample], held_fraction: float, seed: int) -> tuple[list, list]:
    by_prompt: dict[tuple, list[Sample]] = {}
    for s in samples:
        by_prompt.setdefault(tuple(s.tokens[:s.prompt_len]), []).append(s)
    groups = list(by_prompt.values())
    random.Random(seed).shuffle(groups)
    n_held = max(1, round(held_fraction * len(groups))) if len(groups) >= 4 else 0
    return [s for g in groups[n_held:] for s in g], [s for g in groups[:n_held] for s in g]


@torch.no_grad()
def evaluate(head: SpeculatorHead, data: _Data, embed, head_w, unroll: int, max_positions: int = 16384) -> list[float]:
    """Per drafting step, top-1 agreement with the target (over the reduced vocabulary)."""
    if not len(data.starts):
        return [float("nan")] * unroll
    g = torch.Generator().manual_seed(0)
    p = data.starts[torch.randperm(len(data.starts), generator=g)[:max_positions]]
    sums = [0.0] * unroll
    for chunk in p.split(2048):
        _, agree = _unrolled_loss(head, data, chunk, embed, head_w, unroll, 0.0)
        sums = [a + b * len(chunk) for a, b in zip(sums, agree)]
    return [x / len(p) for x in sums]


def train_speculator(target_model, samples: Sequence[Sample], vocab: Optional[Sequence[int]], time_budget_s: float, *,
                     intermediate_size: Optional[int] = None, unroll: int = 3, batch_positions: int = 2048,
                     lr: float = 2e-3, max_steps: Optional[int] = None, feature_weight: float = 1.0,
                     seed: int = 0, log=print) -> tuple[SpeculatorHead, dict]:
    """Features, then AdamW on the head until the time budget or max_steps runs out."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    mc = target_model.config
    train_set, held = split_by_prompt(samples, 0.05, seed)
    everything = list(train_set) + list(held)
    feats, offsets = target_features(target_model, everything)
    tokens = torch.tensor([t for s in everything for t in s.tokens], dtype=torch.long)
    n_train = len(train_set)
    data = _Data(tokens, feats, train_set, offsets[:n_train], unroll)
    val = _Data(tokens, feats, held, offsets[n_train:], unroll)
    from spruce.models.loader import dtype_auto
    dt = dtype_auto()      # the GEMMs' dtype (see _autocast)
    embed = target_model.embed_tokens.detach().to(dt)
    w = target_model.embed_tokens if target_model.lm_head is None else target_model.lm_head
    head_w = (w if vocab is None else w.index_select(0, torch.tensor(list(vocab)))).detach().to(dt)
    head = SpeculatorHead(mc.hidden_size, intermediate_size or mc.intermediate_size, mc.rms_norm_eps)
    head.init_(target_model.norm.detach(), seed)
    log(f"distill: target features for {len(feats)} tokens in {time.perf_counter() - t0:.0f}s; "
        f"{len(data.starts)} training positions, {len(val.starts)} held out")
    budget = max(1.0, time_budget_s - (time.perf_counter() - t0))
    steps_per_epoch = max(1, len(data.starts) // batch_positions)
    total = max_steps or 100 * steps_per_epoch   # in practice the time budget ends it
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="distill: training speculator", unit="step", file=sys.stderr)
    t_train, step, ema = time.perf_counter(), 0, None
    head.train()
    while step < total and time.perf_counter() - t_train < budget and len(data.starts):
        progress = min(1.0, max(step / total, (time.perf_counter() - t_train) / budget))
        scale = min(1.0, (step + 1) / 50) * max(0.05, 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        p = data.starts[torch.randint(len(data.starts), (batch_positions,), generator=g)]
        loss, agree = _unrolled_loss(head, data, p, embed, head_w, unroll, feature_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", top1=f"{agree[0]:.2f}")
        bar.update(1)
    bar.close()
    head.eval()
    head.requires_grad_(False)
    held_top1 = evaluate(head, val, embed, head_w, unroll)
    stats = {"steps": step, "train_seconds": round(time.perf_counter() - t_train, 1),
             "final_loss": None if ema is None else round(ema, 4),
             "val_top1_per_step": [None if x != x else round(x, 4) for x in held_top1],
             "train_positions": int(len(data.starts)), "unroll": unroll}
    log(f"distill: held-out top-1 agreement with the target per drafting step "
        f"{', '.join(f'{x:.3f}' for x in held_top1)} ({step} steps, {stats['train_seconds']}s)")
    return head, stats

"""Distillation data: the target answers the packaged prompts, with its top-k logprobs.

Shared by both kinds of draft `spruce distill` trains (spec/distill.py: a small draft model;
spec/distill_mlp.py: an MLP speculator on the target's hidden states).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch


def load_prompts(path: Optional[str] = None) -> list[dict]:
    """The packaged distillation prompts (or a JSONL file of {"messages": [...]} rows)."""
    text = Path(path).read_text() if path else \
        resources.files("spruce.spec").joinpath("data/distill_prompts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class Sample:
    tokens: list[int]            # prompt + generated
    prompt_len: int
    top_ids: torch.Tensor        # [O, k] teacher's top token ids at each generated position
    top_logprobs: torch.Tensor   # [O, k] their raw logprobs (-inf padding)


def generate_corpus(llm, prompts: list[dict], max_tokens: int, temperature: float, top_k: int,
                    seed: int, time_budget_s: Optional[float] = None,
                    samples_per_prompt: int = 1, greedy_first: bool = False) -> list[Sample]:
    """The target answers the prompts (sampled; all submitted at once, so the engine batches
    them continuously) and reports its top-k raw logprobs at every generated token. Requests
    still running when the time budget is spent are aborted and left out. `greedy_first`: the
    first answer to each prompt is the greedy one (the text a greedy workload drafts on)."""
    from tqdm import tqdm

    from spruce.sampling_params import SamplingParams
    eng, tok = llm.engine, llm.tokenizer
    pending: dict[str, int] = {}
    # Round-robin over the prompts: a spent time budget then leaves whole rounds out.
    for r in range(samples_per_prompt):
        for i, p in enumerate(prompts):
            ids = tok.encode(tok.apply_chat_template(p["messages"], add_generation_prompt=True),
                             add_special_tokens=False)
            greedy = greedy_first and r == 0
            params = SamplingParams(temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else 0.95,
                                    max_tokens=max_tokens,
                                    logprobs=top_k, seed=(seed * samples_per_prompt + r) * 100_003 + i,
                                    detokenize=False)
            pending[eng.add_request(ids, params)] = i
    samples: list[Sample] = []
    t0, n_tok = time.perf_counter(), 0
    bar = tqdm(total=len(pending), desc="distill: generating", unit="answer", file=sys.stderr)
    def collect(out) -> int:
        c = out.outputs[0]
        n = min(len(c.token_ids), len(c.logprobs or ()))
        if n == 0:
            return 0
        k = max(len(d) for d in c.logprobs[:n])
        top_ids = torch.zeros(n, k, dtype=torch.long)
        top_lp = torch.full((n, k), -math.inf)
        for j, d in enumerate(c.logprobs[:n]):
            for m, (tid, lp) in enumerate(d.items()):
                top_ids[j, m], top_lp[j, m] = tid, lp.logprob
        samples.append(Sample(list(out.prompt_token_ids) + list(c.token_ids[:n]),
                              len(out.prompt_token_ids), top_ids, top_lp))
        return n

    while pending:
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            # Out of time: what the running requests generated so far is still good data.
            left = sum(1 for r in eng.scheduler.running if r.request_id in pending)
            print(f"\ndistill: generation budget spent; keeping {left} partial answers, "
                  f"{len(pending) - left} prompts unused", file=sys.stderr)
            for out in eng.abort_request(list(pending)):
                n_tok += collect(out)
            break
        for out in eng.step():
            if out.finished and out.request_id in pending:
                del pending[out.request_id]
                bar.update(1)
                n_tok += collect(out)
                bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
    bar.close()
    return samples


def choose_draft_vocab(samples: list[Sample], size: int, always: Sequence[int] = ()) -> list[int]:
    """The `size` tokens with the most teacher probability mass over the corpus (plus the
    generated tokens' counts, and `always`: the stop tokens), most frequent first."""
    score: dict[int, float] = {}
    for s in samples:
        probs = s.top_logprobs.exp()
        for tid, p in zip(s.top_ids.flatten().tolist(), probs.flatten().tolist()):
            if p > 0:
                score[tid] = score.get(tid, 0.0) + p
        for tid in s.tokens[s.prompt_len:]:
            score[tid] = score.get(tid, 0.0) + 1.0
    forced = [t for t in dict.fromkeys(always)]
    ranked = [t for t, _ in sorted(score.items(), key=lambda kv: -kv[1]) if t not in set(forced)]
    return forced + ranked[:max(0, size - len(forced))]

"""Sampler: turns a step's logits into next tokens, vLLM-v1 style.

The pipeline is fixed (vLLM's order): raw logprobs -> min_tokens mask -> logit_bias -> penalties
-> greedy argmax -> temperature -> min-p -> top-k / top-p -> inverse-CDF sampling.
`SamplingMetadata` is built once per step from the batch, and every stage is skipped when no row
uses it, so a plain batch pays only for what it asks. Nothing syncs with the host except the
CPU-only partial top-p path, where a "sync" costs nothing.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from spruce.request import Request
from spruce.sampling_params import MAX_TOP_LOGPROBS

# vLLM's threshold: temperatures below it are greedy (dividing by them would overflow anyway).
_SAMPLING_EPS = 1e-5
# top-p on CPU first looks for the nucleus among this many best tokens; a full-vocab sort of
# 256 x 49152 costs seconds on 2 cores, topk(512) a small fraction of that.
_TOP_P_CANDIDATES = 512


# Prompts never change, so each request's unique prompt ids become a tensor once, not every step.
_PROMPT_IDS: "weakref.WeakKeyDictionary[Request, torch.Tensor]" = weakref.WeakKeyDictionary()


def _prompt_ids(r: Request) -> torch.Tensor:
    t = _PROMPT_IDS.get(r)
    if t is None:
        t = _PROMPT_IDS[r] = torch.unique(torch.tensor(r.prompt_token_ids, dtype=torch.long))
    return t


def _pairs(ids: list, rows: list[int], device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(row, token) index tensors from per-row token lists or tensors; None if empty."""
    lens = [len(x) for x in ids]
    if not sum(lens):
        return None
    toks = torch.cat([x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.long)
                      for x in ids])
    rows_t = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), torch.tensor(lens))
    return rows_t.to(device), toks.to(device)


def _ids_tensor(rows: list[int], cols: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(cols, dtype=torch.long, device=device))


@dataclass
class SamplingMetadata:
    """Batched per-row sampling settings. A field is None when no row needs that stage."""
    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_mask: Optional[torch.Tensor]          # [B] bool; only for mixed batches
    temperature: Optional[torch.Tensor]          # [B, 1]; greedy rows hold 1.0; None if all 1.0
    top_k: Optional[torch.Tensor]                # [B] long, 0 = off for that row
    max_top_k: int                               # host-side max of top_k, so topk() needs no sync
    top_p: Optional[torch.Tensor]                # [B, 1]
    min_p: Optional[torch.Tensor]                # [B, 1] log(min_p); -inf = off
    generators: list[tuple[int, torch.Generator]]  # (row, generator) for seeded random rows
    # Penalties touch only seen tokens, so they stay sparse as (rows, token ids) pairs, repeats
    # allowed: no [B, V] count tensor to fill and scan every step.
    seen_idx: Optional[tuple[torch.Tensor, torch.Tensor]]     # prompt + output, repetition rows
    output_idx: Optional[tuple[torch.Tensor, torch.Tensor]]   # output, frequency/presence rows
    repetition_penalty: Optional[torch.Tensor]   # [B]
    frequency_penalty: Optional[torch.Tensor]    # [B]
    presence_penalty: Optional[torch.Tensor]     # [B]
    min_tokens_idx: Optional[tuple[torch.Tensor, torch.Tensor]]   # (rows, token ids) to mask
    logit_bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # rows, ids, values
    max_num_logprobs: Optional[int]              # None: no row asked for logprobs

    @property
    def no_penalties(self) -> bool:
        return self.seen_idx is None and self.output_idx is None

    @classmethod
    def from_requests(cls, requests: Sequence[Request], vocab_size: int, device="cpu",
                      max_num_logprobs: Optional[int] = None,
                      output_token_ids: Optional[Sequence[Sequence[int]]] = None) -> "SamplingMetadata":
        """One row per entry of `requests`; a request may fill several rows (speculative
        verification), each with its own history via `output_token_ids[row]` (default: the
        request's real output). Seeded rows of one request draw from its generator in row order."""
        B, V = len(requests), vocab_size
        sps = [r.sampling_params for r in requests]
        hists = output_token_ids if output_token_ids is not None else [r.output_token_ids for r in requests]
        assert len(hists) == B
        greedy = [sp.temperature < _SAMPLING_EPS for sp in sps]
        random_rows = [i for i in range(B) if not greedy[i]]

        def col(vals, dtype=torch.float32):
            return torch.tensor(vals, dtype=dtype, device=device).unsqueeze(1)

        temps = [1.0 if g else sp.temperature for g, sp in zip(greedy, sps)]
        # Filters only matter on random rows; greedy rows read as "off" so they cost nothing.
        ks = [0 if g or sp.top_k >= V else sp.top_k for g, sp in zip(greedy, sps)]
        ps = [1.0 if g else sp.top_p for g, sp in zip(greedy, sps)]
        mps = [0.0 if g else sp.min_p for g, sp in zip(greedy, sps)]

        rep = [sp.repetition_penalty for sp in sps]
        freq = [sp.frequency_penalty for sp in sps]
        pres = [sp.presence_penalty for sp in sps]
        use_rep, use_freq, use_pres = any(x != 1.0 for x in rep), any(freq), any(pres)
        rep_rows = [i for i in range(B) if rep[i] != 1.0]
        out_rows = [i for i in range(B) if freq[i] or pres[i]]
        seen_idx = _pairs([_prompt_ids(requests[i]) for i in rep_rows] + [hists[i] for i in rep_rows],
                          rep_rows * 2, device)
        output_idx = _pairs([hists[i] for i in out_rows], out_rows, device)

        # vLLM: below min_tokens, every id that would end the sequence is banned (EOS is one of
        # them unless ignore_eos, which makes EOS an ordinary token).
        mt_rows, mt_ids = [], []
        for i, (r, sp) in enumerate(zip(requests, sps)):
            if len(hists[i]) < sp.min_tokens:
                stops = set(sp.stop_token_ids) | sp._all_stop_token_ids
                if r.eos_token_id is not None and not sp.ignore_eos:
                    stops.add(r.eos_token_id)
                stops = [t for t in stops if 0 <= t < V]
                mt_rows += [i] * len(stops)
                mt_ids += stops
        lb_rows, lb_ids, lb_vals = [], [], []
        for i, sp in enumerate(sps):
            for t, v in sp.logit_bias.items():
                if 0 <= t < V:
                    lb_rows.append(i); lb_ids.append(t); lb_vals.append(v)

        if max_num_logprobs is None:
            asked = [sp.logprobs for sp in sps if sp.logprobs is not None]
            max_num_logprobs = max(asked) if asked else None
        if max_num_logprobs is not None:
            max_num_logprobs = min(max_num_logprobs, MAX_TOP_LOGPROBS, V)

        all_greedy, all_random = all(greedy), not any(greedy)
        return cls(
            num_rows=B, vocab_size=V, all_greedy=all_greedy, all_random=all_random,
            greedy_mask=None if all_greedy or all_random else torch.tensor(greedy, device=device),
            temperature=None if all(t == 1.0 for t in temps) else col(temps),
            top_k=torch.tensor(ks, dtype=torch.long, device=device) if any(ks) else None,
            max_top_k=max(ks, default=0),
            top_p=col(ps) if any(p < 1.0 for p in ps) else None,
            min_p=col(mps).log() if any(mps) else None,
            generators=[(i, requests[i].generator) for i in random_rows
                        if requests[i].generator is not None],
            seen_idx=seen_idx, output_idx=output_idx,
            repetition_penalty=col(rep).squeeze(1) if use_rep else None,
            frequency_penalty=col(freq).squeeze(1) if use_freq else None,
            presence_penalty=col(pres).squeeze(1) if use_pres else None,
            min_tokens_idx=_ids_tensor(mt_rows, mt_ids, device) if mt_ids else None,
            logit_bias=(*_ids_tensor(lb_rows, lb_ids, device),
                        torch.tensor(lb_vals, dtype=torch.float32, device=device)) if lb_ids else None,
            max_num_logprobs=max_num_logprobs)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor                  # [B] long
    # (token ids [B, k+1] long, logprobs [B, k+1] float), k = the batch max: column 0 is the
    # sampled token and its raw logprob, then the top-k, best first. None: nobody asked.
    logprobs: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    sampled_token_ranks: Optional[torch.Tensor] = None  # [B] long, 1 = most likely

    def row_logprobs(self, row: int, num_logprobs: int) -> tuple[list[int], list[float], int]:
        """A request's own slice (it may have asked for fewer than the batch max). Syncs."""
        n = num_logprobs + 1
        ids, lps = self.logprobs
        return ids[row, :n].tolist(), lps[row, :n].tolist(), int(self.sampled_token_ranks[row])


class Sampler:
    """Stateless. Like vLLM's, it works on `logits` in place when they are float32 (they are the
    model's per-step scratch output); pass a copy if you still need them afterwards."""

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == md.num_rows
        logits = logits.float()
        # vLLM's default: logprobs describe the model's raw distribution, before any processing.
        raw_logprobs = logits.log_softmax(-1) if md.max_num_logprobs is not None else None
        self._apply_bias_and_penalties(logits, md)

        greedy = None if md.all_random else logits.argmax(-1)
        if md.all_greedy:
            sampled = greedy
        else:
            random = self._sample(logits, md)
            sampled = random if greedy is None else torch.where(md.greedy_mask, greedy, random)

        out = SamplerOutput(sampled_token_ids=sampled)
        if raw_logprobs is not None:
            self._gather_logprobs(raw_logprobs, sampled, md.max_num_logprobs, out)
        return out

    @staticmethod
    def _apply_bias_and_penalties(logits: torch.Tensor, md: SamplingMetadata) -> None:
        if md.min_tokens_idx is not None:
            logits.index_put_(md.min_tokens_idx, torch.tensor(float("-inf"), device=logits.device))
        if md.logit_bias is not None:
            rows, ids, vals = md.logit_bias
            logits.index_put_((rows, ids), vals, accumulate=True)
        if md.no_penalties:
            return
        # Gather-all-then-write makes repeated pairs harmless: each writes the same value.
        if md.seen_idx is not None:
            # HF/vLLM: push every seen token toward "less likely" whatever its sign.
            rows, ids = md.seen_idx
            x, rp = logits[rows, ids], md.repetition_penalty[rows]
            logits[rows, ids] = torch.where(x > 0, x / rp, x * rp)
        if md.output_idx is not None:
            rows, ids = md.output_idx
            if md.presence_penalty is not None:
                logits[rows, ids] = logits[rows, ids] - md.presence_penalty[rows]
            if md.frequency_penalty is not None:
                # Accumulating once per occurrence subtracts frequency * count.
                logits.index_put_((rows, ids), -md.frequency_penalty[rows], accumulate=True)

    @staticmethod
    def probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Temperature, min-p and top-k/top-p applied in place; returns the (possibly unnormalized)
        distribution every random row is drawn from. Speculative verification uses it too."""
        if md.temperature is not None:
            logits.div_(md.temperature)
        if md.min_p is not None:
            # p < min_p * p_max  <=>  logit < max_logit + log(min_p): no softmax needed.
            thresh = logits.amax(-1, keepdim=True) + md.min_p
            logits.masked_fill_(logits < thresh, float("-inf"))
        if md.top_p is not None and logits.device.type == "cpu" and md.vocab_size > _TOP_P_CANDIDATES:
            probs = _top_k_top_p_partial(logits, md.top_k, md.top_p)
        else:
            if md.top_p is not None:
                logits = _top_k_top_p_sorted(logits, md.top_k, md.top_p)
            elif md.top_k is not None:
                logits = _apply_top_k_only(logits, md.top_k, md.max_top_k)
            probs = logits.softmax(-1)
        return probs

    @staticmethod
    def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        probs = Sampler.probs(logits, md)
        # Inverse CDF: one uniform a row against the running sum. At 64 x 49152 it costs ~2 ms on
        # 2 cores where an exponential race (a uniform, a log and a divide per vocab entry) costs
        # ~28 ms. p need not be normalized: u is scaled by the row's total. fp32 prefix sums of
        # non-negative values never decrease, so with right=True a zero-probability token (equal
        # sum to its left neighbour) can never be chosen, and u < total keeps the index in range.
        cdf = probs.cumsum_(-1)
        total = cdf[:, -1:]
        u = torch.empty_like(total)
        if len(md.generators) < md.num_rows:
            u.uniform_()
        # A seeded row's draw uses only its own generator, so its tokens don't depend on the batch.
        for row, gen in md.generators:
            u[row] = torch.rand(1, generator=gen, device=gen.device).to(u.device)
        u = torch.minimum(u.mul_(total), torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, u, right=True).squeeze(1)

    @staticmethod
    def _gather_logprobs(raw: torch.Tensor, sampled: torch.Tensor, k: int, out: SamplerOutput) -> None:
        sampled_lp = raw.gather(1, sampled.unsqueeze(1))
        out.sampled_token_ranks = (raw > sampled_lp).sum(-1) + 1
        if k > 0:
            top_lp, top_ids = raw.topk(k, dim=-1)
            out.logprobs = (torch.cat([sampled.unsqueeze(1), top_ids], dim=1),
                            torch.cat([sampled_lp, top_lp], dim=1))
        else:
            out.logprobs = (sampled.unsqueeze(1), sampled_lp)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """top-k without a full sort: the k-th largest value per row is the cut-off (ties kept)."""
    off = top_k == 0
    k = top_k.masked_fill(off, 1)
    kth = logits.topk(max_top_k, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    kth = kth.masked_fill(off.unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < kth, float("-inf"))


def _top_k_top_p_sorted(logits: torch.Tensor, top_k: Optional[torch.Tensor],
                        top_p: torch.Tensor) -> torch.Tensor:
    """vLLM's: keep the smallest best set whose mass reaches top_p (measured after top-k)."""
    V = logits.shape[-1]
    srt, idx = logits.sort(dim=-1)                    # ascending: the kept tail is at the end
    if top_k is not None:
        first_kept = (V - top_k).masked_fill(top_k == 0, 0).unsqueeze(1)
        srt.masked_fill_(srt < srt.gather(1, first_kept), float("-inf"))
    # A token goes if all tokens at or below it hold <= 1 - top_p of the mass; the best one stays.
    drop = srt.softmax(-1).cumsum_(-1) <= 1 - top_p
    drop[:, -1] = False
    srt.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, idx, srt)


def _top_k_top_p_partial(logits: torch.Tensor, top_k: Optional[torch.Tensor],
                         top_p: torch.Tensor) -> torch.Tensor:
    """The sorted version's result, as unnormalized probs, found among the best
    _TOP_P_CANDIDATES tokens; rows it can't settle there fall back to sorting those rows only.
    Works on probs, which sampling needs anyway, so no full-vocab normalizer is computed twice."""
    B, V = logits.shape
    K = _TOP_P_CANDIDATES
    probs = logits.softmax(-1)
    vals = probs.topk(K, dim=-1).values                                # descending
    k = (torch.full((B,), V, device=logits.device) if top_k is None
         else top_k.masked_fill(top_k == 0, V)).unsqueeze(1)
    in_k = torch.arange(K, device=logits.device) < k
    small_k = k <= K
    p = vals.masked_fill(~in_k, 0.0)
    p /= torch.where(small_k, p.sum(-1, keepdim=True), 1.0)  # top-k renormalizes before top-p
    mass_before = p.cumsum(-1) - p
    n_keep = (in_k & ((mass_before < top_p) | (top_p >= 1))).sum(-1, keepdim=True)
    # Undecided: the nucleus may extend past the candidates, or top-k > K renormalizes over
    # tokens we don't have. Those rows take the sort.
    undecided = ~small_k & ((k < V) | ((n_keep == K) & (top_p < 1)))
    no_filter = undecided | ((k >= V) & (top_p >= 1))
    cutoff = vals.gather(1, n_keep - 1).masked_fill_(no_filter, 0.0)
    probs.masked_fill_(probs < cutoff, 0.0)
    rows = undecided.squeeze(1).nonzero().squeeze(1)
    if rows.numel():
        probs[rows] = _top_k_top_p_sorted(logits[rows], None if top_k is None else top_k[rows],
                                          top_p[rows]).softmax(-1)
    return probs

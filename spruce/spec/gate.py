"""Speculate only while it pays.

Whether drafting and verifying a tree beats a plain decode step depends on the proposer, the
batch and the text, so the engine measures it. Pure-decode steps are timed. The gate keeps an
average of emitted tokens per second for steps with trees and for steps without, per bucket of
running requests (1, 2-3, 4-7, 8+), and takes the better branch. Only drafters that run a model
are gated. An n-gram lookup costs nothing to ask, and its drafts come in bursts of hits and
misses that turned the gate off for 40% of the steps where drafting paid (AMX box, W4 at batch 1:
gated 81.7 tok/s, ungated 92.8, plain 58.8), so EngineCore lets the per-node cut (budget.py)
price its rows alone. A 10-step window of moving sums instead of this 4-step average of rates
measured worse for the draft model (W4 batch 1, single runs: x0.93-0.96 against x1.02-1.04),
since it keeps drafting longer after a good stretch ends. Now and then it takes the other
branch, so that both estimates stay current: once every `probe_every` steps of a bucket. When the
plain step is winning, the interval stretches by how much slower drafting measured (up to 4×),
and doubles each time a drafting probe finds drafting still slower (up to `max_backoff`×), back
to 1× once drafting wins. A draft model's probe is dear -- at 4 requests on the Zen 4 dev box a
drafted step took ~60 ms against ~18 ms (the draft first catches up on the tokens decoded since
its last pass) -- and one in ~40 steps cost ~5% of a W4 batch; repeated confirmations make it
rarer, and EngineCore does not let a draft model catch up on more than `max_draft_backlog`
generated tokens at all (a big batch's tail, decoded plain for a hundred steps, stays plain).
All of this sits on top of the load cap (`max_num_seqs_for_spec`). In a merged tree only the
model drafter is gated: steps the gate keeps plain still carry the cheap lookups' trees, so the
gate compares the merged tree against the lookups alone.
"""
from __future__ import annotations


class SpecGate:
    def __init__(self, probe_every: int = 16, alpha: float = 0.25, max_backoff: int = 8):
        if probe_every < 2:
            raise ValueError("probe_every must be >= 2")
        if max_backoff < 1:
            raise ValueError("max_backoff must be >= 1")
        self.probe_every, self.alpha, self.max_backoff = probe_every, alpha, max_backoff
        self.rate: dict[tuple[int, bool], float] = {}   # (bucket, speculated) -> EMA tokens/s
        self._since_probe: dict[int, int] = {}
        self._backoff: dict[int, int] = {}     # bucket -> multiplier of the drafting-probe interval
        self._probing: dict[int, bool] = {}    # bucket -> the branch its last probe took

    @staticmethod
    def bucket(num_running: int) -> int:
        return min(max(num_running, 1), 8).bit_length()

    def want_spec(self, num_running: int) -> bool:
        b = self.bucket(num_running)
        spec, plain = self.rate.get((b, True)), self.rate.get((b, False))
        if spec is None:
            return True          # measure speculation first ...
        if plain is None:
            return False         # ... then the plain step
        best = spec >= plain
        if best:
            self._backoff[b] = 1
        interval = self.probe_every if best else \
            int(self.probe_every * min(4.0, plain / spec) * self._backoff.get(b, 1))
        n = self._since_probe.get(b, 0) + 1
        if n >= interval:
            self._since_probe[b] = 0
            self._probing[b] = not best
            return not best
        self._since_probe[b] = n
        return best

    def record(self, num_running: int, speculated: bool, num_tokens: int, seconds: float) -> None:
        if seconds <= 0 or num_tokens <= 0:
            return
        key = (self.bucket(num_running), speculated)
        r = num_tokens / seconds
        old = self.rate.get(key)
        self.rate[key] = r if old is None else old + self.alpha * (r - old)
        b = key[0]
        if speculated and self._probing.pop(b, None) is True:
            plain = self.rate.get((b, False))
            still_slower = plain is not None and self.rate[key] < plain
            self._backoff[b] = min(self.max_backoff, 2 * self._backoff.get(b, 1)) if still_slower else 1

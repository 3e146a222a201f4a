"""Speculate only while it pays.

Whether drafting and verifying a tree beats a plain decode step depends on the proposer, the
batch and the text, so the engine measures it. Pure-decode steps are timed. The gate keeps an
average of emitted tokens per second for steps with trees and for steps without, per bucket of
running requests (1, 2-3, 4-7, 8+), and takes the better branch. One step in `probe_every` takes
the other branch so that both estimates stay current. A proposer whose drafts are rarely accepted
therefore costs about one probe step in `probe_every`, not every step. This comes on top of the
load cap (`max_num_seqs_for_spec`).
"""
from __future__ import annotations


class SpecGate:
    def __init__(self, probe_every: int = 16, alpha: float = 0.25):
        if probe_every < 2:
            raise ValueError("probe_every must be >= 2")
        self.probe_every, self.alpha = probe_every, alpha
        self.rate: dict[tuple[int, bool], float] = {}   # (bucket, speculated) -> EMA tokens/s
        self._steps = 0

    @staticmethod
    def bucket(num_running: int) -> int:
        return min(max(num_running, 1), 8).bit_length()

    def want_spec(self, num_running: int) -> bool:
        self._steps += 1
        b = self.bucket(num_running)
        spec, plain = self.rate.get((b, True)), self.rate.get((b, False))
        if spec is None:
            return True          # measure speculation first ...
        if plain is None:
            return False         # ... then the plain step
        best = spec >= plain
        return (not best) if self._steps % self.probe_every == 0 else best

    def record(self, num_running: int, speculated: bool, num_tokens: int, seconds: float) -> None:
        if seconds <= 0 or num_tokens <= 0:
            return
        key = (self.bucket(num_running), speculated)
        r = num_tokens / seconds
        old = self.rate.get(key)
        self.rate[key] = r if old is None else old + self.alpha * (r - old)

"""SamplingParams: per-request decoding settings, validated when built (vLLM's names)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: off
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16      # None: up to the context length
    min_tokens: int = 0
    logprobs: Optional[int] = None      # number of top logprobs per token (0: the sampled one only)
    skip_special_tokens: bool = True
    detokenize: bool = True
    speculate: bool = True              # per-request opt-out of speculative decoding
    # Filled by the engine from the model's generation config: extra ids that end a sequence.
    _all_stop_token_ids: set = field(default_factory=set, repr=False)

    def __post_init__(self):
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _validate(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be -1, 0 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if self.min_tokens < 0:
            bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            bad("logprobs", f"(top logprobs) must be in [0, {MAX_TOP_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        for v in self.logit_bias.values():
            if not -100 <= v <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {v}")

    def validate_token_ids(self, vocab_size: int) -> None:
        """Token-id fields checked against the model's vocabulary (the engine calls this)."""
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list(self.logit_bias))):
            for t in ids:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"{name} has token id {t} outside the vocabulary [0, {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_seeded_sampling(self) -> bool:
        """Draws from the request's own seeded generator: its text must depend on nothing else,
        neither timing nor the rest of the batch."""
        return self.seed is not None and not self.is_greedy

    def clone(self, **changes) -> "SamplingParams":
        from dataclasses import replace
        return replace(self, **changes)

"""Request: one sequence moving through the engine, and its status."""
from __future__ import annotations

import enum
import time
from typing import Optional

import torch

from spruce.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return {RequestStatus.FINISHED_STOPPED: "stop",
                RequestStatus.FINISHED_LENGTH_CAPPED: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_id: Optional[int] = None, arrival_time: Optional[float] = None,
                 priority: int = 0, lora_id: Optional[int] = None, cache_salt: Optional[str] = None,
                 max_tokens: Optional[int] = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority
        self.lora_id = lora_id
        self.cache_salt = cache_salt
        # The effective cap (SamplingParams.max_tokens, clipped to the context by the engine).
        self.max_tokens = max_tokens if max_tokens is not None else sampling_params.max_tokens
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1      # prefix-cache hit length at first schedule (-1: not yet)
        self.num_preemptions = 0
        self.stop_reason: Optional[int | str] = None
        self.block_hashes: list[int] = []  # chained hashes of this request's full blocks
        # Per-token top logprobs, when asked for: list of (token_ids, logprobs) per output token.
        self.output_logprobs: list = []
        # A draft tree proposed for this step (speculative decoding); root = the last token.
        self.spec_tree = None
        self.num_spec_steps = 0          # verification steps this request took part in
        self.num_spec_accepted = 0       # draft tokens accepted over them
        self.spec_record = None          # its lookup nodes' acceptance by depth (spec/budget.py)
        self.generator: Optional[torch.Generator] = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling_params.seed)
        # Timings (time.time()) for metrics and the offline API.
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __lt__(self, other: "Request") -> bool:  # stable order for heaps
        return (self.priority, self.arrival_time) < (other.priority, other.arrival_time)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, {self.status.name})")

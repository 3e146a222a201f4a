"""Unified token-budget scheduler (vLLM v1's model).

There are no prefill and decode phases: each step hands out `max_num_batched_tokens`, and every
scheduled request advances `num_computed_tokens` toward `num_tokens`. A prefix-cache hit just
starts a request further along; a chunked prefill is a request that got fewer tokens than it
wanted; a preempted request starts over (its cached blocks usually make that cheap).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from spruce.config import EngineConfig
from spruce.engine.policy import SchedulingPolicy, make_policy
from spruce.kv.manager import KVCacheManager
from spruce.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int                # query tokens this step (a tree's nodes when speculating)
    block_ids: list[int]
    spec_tree: Optional["TokenTree"] = None  # noqa: F821 (spruce.spec.tree), to verify this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so its last logit is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens >= r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_prompt_tokens: int = 0       # prompt tokens admitted (for metrics)
    num_generation_tokens: int = 0


class Scheduler:
    def __init__(self, config: EngineConfig, kv_manager: KVCacheManager, max_model_len: int,
                 policy: Optional[SchedulingPolicy] = None):
        self.config = config.scheduler_config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.policy = policy or make_policy(self.config.policy)
        self.waiting = self.policy.new_waiting_queue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()

    # ----- requests in and out -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, or stop from outside, e.g. a stop string) requests in any state."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove([req])
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        req.finished_time = time.time()
        self.kv.free(req)
        self.requests.pop(req.request_id, None)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # ----- one step --------------------------------------------------------------------------
    def _cap(self, req: Request, num_new: int, budget: int) -> int:
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0:
            num_new = min(num_new, threshold)
        return min(num_new, budget)

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.stats.num_preemptions += 1
        out.preempted.append(victim)
        self.waiting.prepend(victim)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = time.time()

        # Running requests first: they already hold KV, and decodes are one token each.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._cap(req, req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            tree = req.spec_tree if req.num_tokens - req.num_computed_tokens == 1 else None
            if tree is not None and len(tree) > budget:
                tree = None  # the budget decides: a tree that does not fit is not verified
            lookahead = len(tree) - 1 if tree is not None else 0
            while self.kv.allocate_slots(req, num_new, num_lookahead_tokens=lookahead) is None:
                victim = self.policy.pick_victim(self.running)
                for k, s in enumerate(out.scheduled):
                    if s.request is victim:  # give back what the victim was promised this step
                        budget += s.num_new_tokens
                        del out.scheduled[k]
                        i -= 1
                        break
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new + lookahead,
                                                      self.kv.get_block_ids(req.request_id), tree))
                budget -= num_new + lookahead
                i += 1
                continue
            # req itself was preempted; the list shifted under i, so re-read the same index.

        # Then admit waiting requests, unless this step already had to preempt.
        max_seqs = self.config.max_num_seqs
        while not out.preempted and len(self.waiting) > 0 and budget > 0 and len(self.running) < max_seqs:
            req = self.waiting.peek()
            computed_blocks, num_hit = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = self._cap(req, num_new, budget)
            if self.kv.allocate_slots(req, num_new, computed_blocks, num_hit) is None:
                break
            self.waiting.pop()
            if req.status == RequestStatus.WAITING:
                self.stats.num_prompt_tokens += req.num_prompt_tokens
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new, self.kv.get_block_ids(req.request_id)))
            budget -= num_new
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests that hit a stop.

        Returns the requests that got new tokens this step (finished ones included)."""
        updated = []
        now = time.time()
        for s in out.scheduled:
            req = s.request
            new_ids = sampled.get(req.request_id)
            if s.spec_tree is not None:
                # The root and the accepted nodes now have K/V at their real positions; the
                # bonus token (last) does not yet, and the rejected nodes' slots go back.
                req.num_computed_tokens += len(new_ids)
                self.kv.release_slots_beyond(req, req.num_computed_tokens + 1)
            else:
                req.num_computed_tokens += s.num_new_tokens
            if not new_ids:
                continue  # a prefill chunk that did not reach the end of the prompt
            if req.first_token_time is None:
                req.first_token_time = now
            for tok in new_ids:
                req.append_output_token_ids([tok])
                self.stats.num_generation_tokens += 1
                status = self._check_stop(req, tok)
                if status is not None:
                    self.running.remove(req)
                    self._finish(req, status)
                    break
            updated.append(req)
        return updated

    def _check_stop(self, req: Request, token: int) -> Optional[RequestStatus]:
        params = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token == req.eos_token_id:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in params._all_stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if (req.max_tokens is not None and n_out >= req.max_tokens) or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

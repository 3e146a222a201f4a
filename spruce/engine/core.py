"""EngineCore: owns the model, KV cache, scheduler and output processing; `step()` runs one batch."""
from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from spruce.config import EngineConfig
from spruce.engine.output_processor import OutputProcessor
from spruce.engine.runner import ModelRunner, ModelRunnerOutput
from spruce.engine.scheduler import Scheduler, SchedulerOutput
from spruce.kv.manager import KVCacheManager
from spruce.models.kv_memory import prefault
from spruce.models.llama import allocate_kv_cache
from spruce.models.loader import dtype_auto, load_model
from spruce.models.resolve import resolve_model
from spruce.outputs import RequestOutput
from spruce.request import Request, RequestStatus
from spruce.sampling_params import SamplingParams
from spruce.tokenizer import Tokenizer

logger = logging.getLogger("spruce")

PromptType = Union[str, list[int]]


def _default_kv_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 << 30
    return min(4 << 30, total // 4)


@dataclass
class SpecDecodingStats:
    """vLLM's spec-decode counters (vllm:spec_decode_*)."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list = field(default_factory=list)

    def record(self, num_draft_tokens: int, accepted_per_pos: list[int]) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += sum(accepted_per_pos)
        if len(self.num_accepted_tokens_per_pos) < len(accepted_per_pos):
            self.num_accepted_tokens_per_pos += [0] * (len(accepted_per_pos) - len(self.num_accepted_tokens_per_pos))
        for i, a in enumerate(accepted_per_pos):
            self.num_accepted_tokens_per_pos[i] += a

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step (accepted drafts + the bonus token)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    model_config: object
    tokenizer: Tokenizer
    dtype: torch.dtype


def load(config: EngineConfig) -> LoadedModel:
    mc = config.model_config
    device = torch.device(mc.device)
    resolved = resolve_model(mc.model, mc.revision)
    tokenizer = Tokenizer.from_resolved(resolve_model(mc.tokenizer) if mc.tokenizer else resolved)
    dtype = dtype_auto(device) if mc.dtype == "auto" else getattr(torch, mc.dtype)
    model, model_config = load_model(resolved, dtype, device, mc.max_model_len)
    return LoadedModel(resolved.name, model, model_config, tokenizer, dtype)


class EngineCore:
    def __init__(self, config: EngineConfig, log_progress: bool = True, loaded: Optional[LoadedModel] = None):
        """`loaded` reuses weights already in memory (tests build many engines over one model)."""
        self.config = config
        mc, cc = config.model_config, config.cache_config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(mc.seed)
        self.device = torch.device(mc.device)
        t0 = time.perf_counter()
        loaded = loaded or load(config)
        self.model_name, self.tokenizer, self.dtype = loaded.name, loaded.tokenizer, loaded.dtype
        self.model, self.model_config = loaded.model, loaded.model_config
        self.vocab_size = self.model_config.vocab_size
        self.max_model_len = min(mc.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.num_blocks = self._num_blocks()
        self.kv_caches = allocate_kv_cache(self.model_config, self.num_blocks, cc.block_size, self.dtype, self.device)
        if cc.kv_prefault:
            self._prefault_kv(log_progress)
        self.kv_manager = KVCacheManager(self.num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv_manager, self.max_model_len)
        self.runner = ModelRunner(self.model, self.kv_caches, cc.block_size, self.vocab_size, self.device,
                                  config.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.spec_config = config.speculative_config
        self.proposer = None
        self.spec_stats = SpecDecodingStats()
        self.spec_gate = None
        self.spec_record = None   # acceptance of lookup nodes over all requests (spec/budget.py)
        self.step_cost = None     # what a verified row costs here, fitted from step times
        if self.spec_config is not None:
            from spruce.spec.budget import AcceptanceRecord, StepCost
            from spruce.spec.gate import SpecGate
            from spruce.spec.proposers import make_proposer
            self.proposer = make_proposer(self.spec_config, self)
            self.runner.return_hidden = self.proposer.needs_hidden
            if self.spec_config.adaptive:
                self.spec_gate = SpecGate()
                self.spec_record = AcceptanceRecord()
                self.step_cost = StepCost()
        self._ids = itertools.count()
        if log_progress:
            print(f"[spruce] loaded {self.model_name} ({self.dtype}, {self.device}) in "
                  f"{time.perf_counter() - t0:.1f}s; KV cache {self.num_blocks} blocks x {cc.block_size} tokens",
                  file=sys.stderr)

    def _prefault_kv(self, log_progress: bool) -> None:
        t, tensors = time.perf_counter(), [x for kv in self.kv_caches for x in kv]
        if log_progress:
            gib = sum(x.numel() * x.element_size() for x in tensors) / (1 << 30)
            print(f"[spruce] making the {gib:.1f} GiB KV cache resident ...", file=sys.stderr, flush=True)
        ok = prefault(tensors, torch.get_num_threads())
        if log_progress and ok:
            print(f"[spruce] KV cache resident in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        elif log_progress:
            print("[spruce] this kernel cannot populate pages (MADV_POPULATE_WRITE, Linux >= 5.14): "
                  "the KV cache faults in as it is first written", file=sys.stderr)

    def _num_blocks(self) -> int:
        cc, m = self.config.cache_config, self.model_config
        if cc.num_gpu_blocks_override:
            return cc.num_gpu_blocks_override
        budget = cc.kv_cache_memory or _default_kv_bytes(self.device)
        per_block = 2 * m.num_hidden_layers * cc.block_size * m.num_key_value_heads * m.head_dim \
            * torch.empty((), dtype=self.dtype).element_size()
        n = budget // per_block
        if n < 2:
            raise ValueError(f"kv_cache_memory={budget} bytes holds fewer than 2 blocks of {per_block} bytes")
        return int(n)

    # ----- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: Optional[str] = None,
                    priority: int = 0, arrival_time: Optional[float] = None, lora_id: Optional[int] = None,
                    cache_salt: Optional[str] = None) -> str:
        """Validate and queue one prompt. Raises ValueError naming the bad field; nothing is queued then."""
        request_id = str(next(self._ids)) if request_id is None else request_id
        if self.output_processor.has(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        params.validate_token_ids(self.vocab_size)
        n = len(token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt is {n} tokens; the model's context (max_model_len) is {self.max_model_len}, "
                             "which must leave room for at least one generated token")
        capacity = self.num_blocks * self.config.cache_config.block_size
        if n + 1 > capacity:
            raise ValueError(f"prompt is {n} tokens but the KV cache holds only {capacity}; "
                             "raise --kv-cache-memory")
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if not params.ignore_eos:
            params._all_stop_token_ids |= set(self.tokenizer.stop_token_ids) - {self.tokenizer.eos_token_id}
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone(n=1, seed=None if params.seed is None else params.seed + i)
                child_params._all_stop_token_ids = set(params._all_stop_token_ids)
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append(Request(child_id, token_ids, child_params, self.tokenizer.eos_token_id,
                                    arrival_time, priority, lora_id, cache_salt, max_tokens))
        self.output_processor.add(request_id, text, children)
        for child in children:
            self.scheduler.add_request(child)
        return request_id

    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty (prompt_token_ids is [])")
        for t in ids:
            if not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt_token_ids has token id {t!r} outside the vocabulary [0, {self.vocab_size})")
        return None, ids

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        child_ids = [c for rid in request_ids for c in self.output_processor.child_ids(rid)]
        aborted = self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        if self.proposer is not None:
            self.proposer.on_finished([r.request_id for r in aborted])
        outputs, _ = self.output_processor.process([], {}, aborted)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ----- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0, speculated = time.perf_counter(), self._propose()
        scheduled, t1 = self.scheduler.schedule(), time.perf_counter()
        model_output = self.runner.execute(scheduled) if not scheduled.is_empty else ModelRunnerOutput()
        self._time_step(scheduled, model_output, speculated, t0, t1)
        return self._update(scheduled, model_output)

    def _propose(self) -> Optional[bool]:
        """Attach draft trees to decoding requests for the scheduler to budget. Under load (more
        running requests than max_num_seqs_for_spec) nothing is drafted: a big batch already
        uses the hardware well, and verifying rejected drafts would only slow it down. Below it
        the gate (spec/gate.py) lets a drafter that runs a model draft only while drafting
        measures faster, and only for requests it has kept up with (max_draft_backlog) -- except
        for seeded sampled requests, whose draws (and so whose text) would otherwise depend on
        timing. A lookup, alone or as a merged tree's cheap part, drafts whenever it finds
        something, and the per-node cut (spec/budget.py) prices its rows.
        Returns what the gate chose for the whole step (None: not asked, or a mixed step)."""
        running = self.scheduler.running
        if self.proposer is None or not running or len(running) > self.spec_config.max_num_seqs_for_spec:
            return None
        reqs = [r for r in running if r.num_tokens - r.num_computed_tokens == 1 and r.sampling_params.speculate
                and (r.max_tokens is None or r.num_output_tokens + 1 < r.max_tokens)]
        full = [True] * len(reqs)
        if self.spec_gate is not None and not self.proposer.cheap:
            gate_open = self.spec_gate.want_spec(len(running))
            max_backlog = self.spec_config.max_draft_backlog
            full = [r.sampling_params.is_seeded_sampling or (gate_open and self.proposer.backlog(r) <= max_backlog)
                    for r in reqs]
        # The value a verified row must bring (spec/budget.py): drafters stop below it, the cut
        # drops what is left below it.
        threshold = self.step_cost.row_value(len(running)) if self.spec_record is not None else 0.0
        trees = self._trees(reqs, full, threshold)
        # What the gate times: steps where the model drafter ran for every request against steps
        # where it ran for none (a merged tree's cheap lookups may still draft in those).
        chose = True if all(full) else False if not any(full) else None
        if chose and not any(t is not None and len(t) > 1 for t in trees):
            # Nothing to propose (no n-gram match): a plain step, and the gate must time it as one,
            # or the lookups' misses would make drafting look no better than not drafting.
            chose = False
        if self.spec_record is not None and trees:
            trees = self._cut(reqs, trees, len(running), threshold)
        for req, tree in zip(reqs, trees):
            if tree is not None and len(tree) > 1 and req.num_tokens + max(tree.depths) <= self.max_model_len:
                req.spec_tree = tree
        return chose

    def _trees(self, reqs: list, full: list[bool], min_prob: float) -> list:
        """The full proposer's trees for requests marked `full`, its cheap part's for the rest;
        a drafter stops below nodes of estimated acceptance under `min_prob`."""
        trees: list = [None] * len(reqs)
        for want_full, propose in ((True, lambda rs: self.proposer.propose(rs, min_prob)),
                                   (False, self.proposer.propose_cheap)):
            idx = [i for i, f in enumerate(full) if f == want_full]
            if idx:
                for i, t in zip(idx, propose([reqs[i] for i in idx])):
                    trees[i] = t
        return trees

    def _cut(self, reqs: list, trees: list, num_running: int, threshold: float) -> list:
        """The trees cut to the nodes that pay for their rows (spec/budget.py). A seeded sampled
        request's draws follow its tree, so its tree must not depend on timing (the fitted row
        price) or on the rest of the batch (the row cap): it is kept whole."""
        from spruce.spec.budget import AcceptanceRecord, cut_trees
        for r in reqs:
            if r.spec_record is None:
                r.spec_record = AcceptanceRecord()
        seeded = [r.sampling_params.is_seeded_sampling for r in reqs]
        cut = cut_trees([None if f else t for t, f in zip(trees, seeded)], [r.spec_record for r in reqs],
                        self.spec_record, num_running, self.spec_config.max_num_verify_rows, threshold)
        return [t if f else c for t, c, f in zip(trees, cut, seeded)]

    def _time_step(self, scheduled: SchedulerOutput, model_output: ModelRunnerOutput,
                   speculated: Optional[bool], t_propose: float, t_execute: float) -> None:
        # Only pure-decode steps tell the gate anything: a prefill chunk's time is not the
        # drafts' cost. (The drafting time is in the gate's seconds: it is part of what
        # speculation costs; the row cost is fitted to the target's forward alone.)
        if self.spec_gate is None or scheduled.is_empty:
            return
        if any(s.spec_tree is None and s.num_new_tokens != 1 for s in scheduled.scheduled):
            return
        now = time.perf_counter()
        self.step_cost.observe(scheduled.total_num_scheduled_tokens, now - t_execute)
        if speculated is not None:
            self.spec_gate.record(len(scheduled.scheduled), speculated,
                                  sum(len(t) for t in model_output.sampled.values()), now - t_propose)

    def _update(self, scheduled: SchedulerOutput, model_output: ModelRunnerOutput) -> list[RequestOutput]:
        for s in scheduled.scheduled:
            req = s.request
            if req.spec_tree is not None and self.spec_record is not None:
                emitted = model_output.sampled.get(req.request_id)
                if emitted:
                    self.spec_record.record(req.spec_tree, emitted)
                    req.spec_record.record(req.spec_tree, emitted)
            req.spec_tree = None
        for rid, (num_draft, accepted) in model_output.spec_stats.items():
            self.spec_stats.record(num_draft, accepted)
            req = self.scheduler.requests[rid]
            req.num_spec_steps += 1
            req.num_spec_accepted += sum(accepted)
        updated = self.scheduler.update_from_output(scheduled, model_output.sampled)
        if model_output.hidden:
            self.proposer.observe_hidden(updated, model_output.hidden)
        outputs, stopped = self.output_processor.process(updated, model_output.logprobs)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if self.proposer is not None:   # drop draft state (draft KV) of finished/preempted requests
            finished = [r for r in updated if r.is_finished]
            self.proposer.observe_finished(finished)
            self.proposer.on_finished([r.request_id for r in finished] + [r.request_id for r in scheduled.preempted])
        return outputs

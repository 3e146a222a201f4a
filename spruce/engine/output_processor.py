"""OutputProcessor: token ids -> text (incremental, UTF-8 safe), stop strings, and RequestOutputs.

A request with n > 1 is run as n child requests ("{i}_{parent_id}"); this is where their
completions are gathered back under the parent's id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from spruce.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from spruce.request import Request, RequestStatus
from spruce.tokenizer import IncrementalDetokenizer, Tokenizer, check_stop_strings, withheld_len


@dataclass
class _Child:
    request: Request
    index: int
    detokenizer: Optional[IncrementalDetokenizer]
    text: str = ""
    num_tokens_sent: int = 0       # token ids already handed out in deltas
    text_sent: int = 0
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None


@dataclass
class _Parent:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    children: list[_Child] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_of: dict[str, tuple[_Parent, _Child]] = {}

    def add(self, parent_id: str, prompt: Optional[str], children: list[Request]) -> None:
        parent = _Parent(parent_id, prompt, children[0].prompt_token_ids)
        for i, req in enumerate(children):
            params = req.sampling_params
            detok = (IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.skip_special_tokens)
                     if params.detokenize else None)
            child = _Child(req, i, detok, logprobs=[] if params.logprobs is not None else None)
            parent.children.append(child)
            self.child_of[req.request_id] = (parent, child)
        self.parents[parent_id] = parent

    def child_ids(self, parent_id: str) -> list[str]:
        parent = self.parents.get(parent_id)
        return [c.request.request_id for c in parent.children] if parent else []

    def has(self, parent_id: str) -> bool:
        return parent_id in self.parents

    def process(self, updated: list[Request], logprobs: dict, aborted: list[Request] = ()) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs of parents that changed, and the child ids stopped by a stop string
        (the caller must finish those in the scheduler)."""
        touched: dict[str, _Parent] = {}
        stopped: list[str] = []
        for req in updated:
            parent, child = self.child_of[req.request_id]
            new_ids = req.output_token_ids[child.num_tokens_sent:]
            if child.logprobs is not None:
                self._add_logprobs(child, logprobs.get(req.request_id, []))
            if child.detokenizer is not None:
                delta = child.detokenizer.update(new_ids)
                child.text += delta
                stop = req.sampling_params.stop
                if stop and not req.is_finished:
                    cut, matched = check_stop_strings(child.text, len(delta), stop,
                                                      req.sampling_params.include_stop_str_in_output)
                    if matched is not None:
                        child.text = child.text[:cut] if cut is not None else child.text
                        child.finish_reason, child.stop_reason = "stop", matched
                        req.stop_reason = matched
                        stopped.append(req.request_id)
            if req.is_finished and child.finish_reason is None:
                child.finish_reason = req.status.finish_reason
                child.stop_reason = req.stop_reason
            touched[parent.request_id] = parent
        for req in aborted:
            entry = self.child_of.get(req.request_id)
            if entry and entry[1].finish_reason is None:
                entry[1].finish_reason = RequestStatus.FINISHED_ABORTED.finish_reason
                touched[entry[0].request_id] = entry[0]
        outputs = [self._make_output(p) for p in touched.values()]
        for p in touched.values():
            if p.finished:
                self._forget(p)
        return outputs, stopped

    def _add_logprobs(self, child: _Child, entries: list) -> None:
        # Without detokenization (as in vLLM) the tokens' texts are left out too: decoding every
        # top-k token is most of the cost of logprobs=20 over a long generation (spruce distill).
        decode = child.detokenizer is not None
        for ids, vals in entries:
            d = {}
            for rank, (tid, val) in enumerate(zip(ids, vals)):
                if rank > 0 and tid in d:
                    d[tid].rank = rank
                    continue
                d[tid] = Logprob(val, rank if rank > 0 else None,
                                 self.tokenizer.decode([tid], skip_special_tokens=False) if decode else None)
            child.logprobs.append(d)
            child.cumulative_logprob += vals[0]

    def _make_output(self, parent: _Parent) -> RequestOutput:
        completions, deltas = [], {}
        first = parent.children[0].request
        for c in parent.children:
            ids = c.request.output_token_ids
            visible = len(c.text)
            stop = c.request.sampling_params.stop
            if stop and c.finish_reason is None:  # a stream must not show the start of a stop string
                visible -= withheld_len(c.text, stop)
            visible = max(visible, c.text_sent)
            deltas[c.index] = (c.text[c.text_sent:visible], ids[c.num_tokens_sent:])
            c.text_sent, c.num_tokens_sent = visible, len(ids)
            completions.append(CompletionOutput(
                c.index, c.text, list(ids), c.finish_reason, c.stop_reason, c.logprobs,
                c.cumulative_logprob if c.logprobs is not None else None))
        reqs = [c.request for c in parent.children]
        metrics = RequestMetrics(first.arrival_time, first.first_scheduled_time, first.first_token_time,
                                 first.finished_time, sum(r.num_preemptions for r in reqs),
                                 sum(r.num_spec_steps for r in reqs), sum(r.num_spec_accepted for r in reqs))
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions,
                             parent.finished, metrics, max(first.num_cached_tokens, 0), deltas)

    def _forget(self, parent: _Parent) -> None:
        self.parents.pop(parent.request_id, None)
        for c in parent.children:
            self.child_of.pop(c.request.request_id, None)

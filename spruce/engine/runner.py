"""ModelRunner: flattens a SchedulerOutput into one varlen batch, runs the model, samples.

Everything that touches tensors lives here; the scheduler never sees one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from spruce.attention.metadata import AttentionMetadata
from spruce.engine.sampler import Sampler, SamplingMetadata
from spruce.engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)
    # request id -> per new token: (token ids, logprobs), column 0 the sampled token.
    logprobs: dict[str, list[tuple[list[int], list[float]]]] = field(default_factory=dict)
    # Speculative requests: request id -> (draft tokens proposed, accepted per depth as 0/1 list).
    spec_stats: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    # request id -> the logits row that gave its last token this step (always for tree requests,
    # for plain ones only with return_hidden), and with return_hidden the final-normed hidden
    # state of that row (what an MLP speculator drafts from).
    final_rows: dict[str, int] = field(default_factory=dict)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class FlatBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor          # hidden rows whose logits are needed: tree nodes, then samples
    sampling_rows: list                    # the Request behind each plainly sampled logits row
    spec: list[tuple[ScheduledRequest, int]]  # (tree request, first logits row of its nodes)


class ModelRunner:
    def __init__(self, model, kv_caches, block_size: int, vocab_size: int, device: torch.device,
                 max_logprobs: int = 20):
        self.model = model
        self.kv_caches = kv_caches
        self.return_hidden = False   # set when the proposer drafts from hidden states
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.max_logprobs = max_logprobs
        self.sampler = Sampler()

    def prepare(self, out: SchedulerOutput) -> FlatBatch:
        bs = self.block_size
        input_ids: list[int] = []
        query_start_loc = [0]
        seq_lens, query_lens, starts = [], [], []
        block_tables: list[list[int]] = []
        spec_indices, plain_indices, sampling_rows, spec = [], [], [], []
        tree_masks: Optional[list] = None
        rope_overrides = []  # (token offset, tree) for trees: rope positions follow depth
        for i, s in enumerate(out.scheduled):
            req, tree = s.request, s.spec_tree
            start = req.num_computed_tokens
            end = start + s.num_new_tokens
            first_row = query_start_loc[-1]
            if tree is None:
                input_ids.extend(req.all_token_ids[start:end])
            else:
                input_ids.extend(tree.tokens)
                rope_overrides.append((first_row, start, tree))
                tree_masks = tree_masks or [None] * len(out.scheduled)
                tree_masks[i] = tree.ancestor_mask()
            starts.append(start)
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            query_start_loc.append(first_row + s.num_new_tokens)
            block_tables.append(s.block_ids)
            if tree is not None:
                spec.append((s, len(spec_indices)))
                spec_indices.extend(range(first_row, first_row + len(tree)))
            elif s.samples:
                plain_indices.append(first_row + s.num_new_tokens - 1)
                sampling_rows.append(req)
        if tree_masks is not None:
            tree_masks += [None] * (len(out.scheduled) - len(tree_masks))
        num_reqs = len(seq_lens)
        width = max(len(b) for b in block_tables)
        table = torch.zeros(num_reqs, width, dtype=torch.long)
        for i, b in enumerate(block_tables):
            table[i, :len(b)] = torch.tensor(b, dtype=torch.long)
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        req_of_token = torch.repeat_interleave(torch.arange(num_reqs), q_lens)
        offsets = torch.arange(len(input_ids)) - torch.tensor(query_start_loc[:-1]).repeat_interleave(q_lens)
        slot_positions = torch.tensor(starts, dtype=torch.long).repeat_interleave(q_lens) + offsets
        slot_mapping = table[req_of_token, slot_positions // bs] * bs + slot_positions % bs
        positions = slot_positions
        if rope_overrides:
            positions = slot_positions.clone()
            for row, start, tree in rope_overrides:
                positions[row:row + len(tree)] = tree.positions(start)
        dev = self.device
        md = AttentionMetadata(
            num_tokens=len(input_ids), query_start_loc=query_start_loc, seq_lens=seq_lens,
            query_lens=query_lens, block_tables=table.to(dev), slot_mapping=slot_mapping.to(dev),
            block_size=bs, seq_lens_t=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            tree_masks=tree_masks)
        return FlatBatch(torch.tensor(input_ids, dtype=torch.long, device=dev), positions.to(dev), md,
                         torch.tensor(spec_indices + plain_indices, dtype=torch.long, device=dev),
                         sampling_rows, spec)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        batch = self.prepare(out)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_metadata)
        result = ModelRunnerOutput()
        if not len(batch.logits_indices):
            return result
        selected = hidden.index_select(0, batch.logits_indices)
        logits = self.model.compute_logits(selected)
        if batch.spec:
            from spruce.spec.decoding import verify_trees
            verify_trees(self, batch.spec, logits, result)
        if batch.sampling_rows:
            first = len(logits) - len(batch.sampling_rows)
            self._sample(batch.sampling_rows, logits[first:], result)
            if self.return_hidden:
                for row, req in enumerate(batch.sampling_rows):
                    result.final_rows[req.request_id] = first + row
        if self.return_hidden and result.final_rows:
            rids = list(result.final_rows)
            rows = torch.tensor([result.final_rows[r] for r in rids], dtype=torch.long, device=selected.device)
            result.hidden = dict(zip(rids, selected.index_select(0, rows).unbind(0)))
        return result

    def _sample(self, rows: list, logits: torch.Tensor, result: ModelRunnerOutput) -> None:
        md = SamplingMetadata.from_requests(rows, self.vocab_size, self.device)
        sampler_out = self.sampler(logits, md)
        token_ids = sampler_out.sampled_token_ids.tolist()
        lp = sampler_out.logprobs
        lp_ids = lp_vals = None
        if lp is not None:
            lp_ids, lp_vals = lp[0].tolist(), lp[1].tolist()
        for row, req in enumerate(rows):
            result.sampled[req.request_id] = [token_ids[row]]
            k = req.sampling_params.logprobs
            if k is not None and lp_ids is not None:
                result.logprobs[req.request_id] = [(lp_ids[row][:k + 1], lp_vals[row][:k + 1])]

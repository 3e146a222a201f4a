"""The runner's speculative step: verify each request's tree against the target's logits, move the
accepted path's K/V to the request's real positions, and report what was emitted."""
from __future__ import annotations

import torch

from spruce.spec.verify import spec_sampling_metadata, target_probs, verify_greedy, verify_stochastic_batch


def verify_trees(runner, spec: list, logits: torch.Tensor, result) -> None:
    """`spec`: (ScheduledRequest, first logits row) per tree request; logits rows are the tree
    nodes of every such request, end to end (then the plain rows, not ours)."""
    reqs = [s.request for s, _ in spec]
    trees = [s.spec_tree for s, _ in spec]
    n = sum(len(t) for t in trees)
    node_logits = logits[:n]
    md = spec_sampling_metadata(reqs, trees, runner.vocab_size, runner.device)
    want_logprobs = any(r.sampling_params.logprobs is not None for r in reqs)
    raw_logprobs = node_logits.float().log_softmax(-1) if want_logprobs else None
    probs = target_probs(node_logits, md)
    if md.all_greedy:
        argmax = probs.argmax(-1).tolist()
        results = [verify_greedy(t, argmax[row:row + len(t)]) for t, (_, row) in zip(trees, spec)]
    else:
        results = verify_stochastic_batch(trees, probs, [r.generator for r in reqs])

    src, dst = [], []
    bs = runner.block_size
    for (s, row), tree, res in zip(spec, trees, results):
        req = s.request
        tokens = res.tokens(tree)
        result.sampled[req.request_id] = tokens
        result.final_rows[req.request_id] = row + (res.accepted[-1] if res.accepted else 0)
        start = req.num_computed_tokens
        for depth, node in enumerate(res.accepted, start=1):
            if node != depth:  # BFS order puts a chain's nodes at their depth already
                src.append(_slot(s.block_ids, start + node, bs))
                dst.append(_slot(s.block_ids, start + depth, bs))
        k = req.sampling_params.logprobs
        if k is not None:
            emit_rows = [row] + [row + node for node in res.accepted]
            result.logprobs[req.request_id] = [_top_logprobs(raw_logprobs[r], t, k)
                                               for r, t in zip(emit_rows, tokens)]
        accepted_per_pos = [0] * max(tree.depths)
        for depth in range(len(res.accepted)):
            accepted_per_pos[depth] = 1
        result.spec_stats[req.request_id] = (len(tree) - 1, accepted_per_pos)
    if src:
        _copy_slots(runner.kv_caches, src, dst, runner.device)


def _slot(block_ids: list[int], pos: int, bs: int) -> int:
    return block_ids[pos // bs] * bs + pos % bs


def _copy_slots(kv_caches, src: list[int], dst: list[int], device) -> None:
    src_t = torch.tensor(src, dtype=torch.long, device=device)
    dst_t = torch.tensor(dst, dtype=torch.long, device=device)
    for key_cache, value_cache in kv_caches:
        for cache in (key_cache, value_cache):
            flat = cache.view(-1, *cache.shape[2:])
            flat.index_copy_(0, dst_t, flat.index_select(0, src_t))  # gathered first: overlaps are safe


def _top_logprobs(row: torch.Tensor, token: int, k: int) -> tuple[list[int], list[float]]:
    top = row.topk(k) if k > 0 else None
    ids = [token] + (top.indices.tolist() if top is not None else [])
    vals = [float(row[token])] + (top.values.tolist() if top is not None else [])
    return ids, vals

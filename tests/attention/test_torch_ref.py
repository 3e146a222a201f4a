"""TorchAttentionBackend vs a naive float64 reference over plain (unpaged) K/V."""
import pytest
import torch

from spruce.attention.backend import get_attention_backend
from spruce.attention.metadata import AttentionMetadata
from spruce.attention.torch_ref import TorchAttentionBackend
from spruce.spec.tree import TokenTree

BS = 4


def make_md(seq_lens, query_lens, tables, tree_masks=None) -> AttentionMetadata:
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    slots = [tables[i][p // BS] * BS + p % BS
             for i, (s, q) in enumerate(zip(seq_lens, query_lens)) for p in range(s - q, s)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    return AttentionMetadata(num_tokens=qsl[-1], query_start_loc=qsl, seq_lens=list(seq_lens),
                             query_lens=list(query_lens), block_tables=bt,
                             slot_mapping=torch.tensor(slots, dtype=torch.int64), block_size=BS,
                             seq_lens_t=torch.tensor(seq_lens), tree_masks=tree_masks)


def tables_for(seq_lens, num_blocks, seed=0):
    """Non-contiguous, disjoint block ids per request."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for s in seq_lens:
        n = (s + BS - 1) // BS
        out.append(perm[:n])
        perm = perm[n:]
    return out


def naive(q, k_ctx, v_ctx, mask, scale):
    """q [ql,H,D], k/v [sl,Hkv,D], mask [ql,sl] -> [ql,H,D] in float64 with repeated K/V."""
    g = q.shape[1] // k_ctx.shape[1]
    k = k_ctx.double().repeat_interleave(g, 1)
    v = v_ctx.double().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


class Scenario:
    """Requests with a known full K/V history; the cache holds the part before this step."""

    def __init__(self, seq_lens, query_lens, h=6, hkv=2, d=8, num_blocks=40, seed=0, tree_masks=None):
        g = torch.Generator().manual_seed(seed)
        self.seq_lens, self.query_lens, self.tree_masks = seq_lens, query_lens, tree_masks
        self.tables = tables_for(seq_lens, num_blocks, seed)
        self.k_full = [torch.randn(s, hkv, d, generator=g) for s in seq_lens]
        self.v_full = [torch.randn(s, hkv, d, generator=g) for s in seq_lens]
        self.q = torch.randn(sum(query_lens), h, d, generator=g)
        self.key_cache = torch.zeros(num_blocks, BS, hkv, d)
        self.value_cache = torch.zeros(num_blocks, BS, hkv, d)
        for i, (s, ql) in enumerate(zip(seq_lens, query_lens)):
            for p in range(s - ql):   # history already cached
                b, o = self.tables[i][p // BS], p % BS
                self.key_cache[b, o], self.value_cache[b, o] = self.k_full[i][p], self.v_full[i][p]
        self.k = torch.cat([kf[s - ql:] for kf, s, ql in zip(self.k_full, seq_lens, query_lens)])
        self.v = torch.cat([vf[s - ql:] for vf, s, ql in zip(self.v_full, seq_lens, query_lens)])
        self.md = make_md(seq_lens, query_lens, self.tables, tree_masks)
        self.scale = d ** -0.5

    def run(self):
        return TorchAttentionBackend().forward(self.q, self.k, self.v, self.key_cache, self.value_cache,
                                               self.md, self.scale)

    def reference(self):
        outs, start = [], 0
        for i, (s, ql) in enumerate(zip(self.seq_lens, self.query_lens)):
            mask = torch.arange(s)[None, :] <= (s - ql + torch.arange(ql))[:, None]
            if self.tree_masks is not None and self.tree_masks[i] is not None:
                mask[:, s - ql:] = self.tree_masks[i]
            outs.append(naive(self.q[start:start + ql], self.k_full[i], self.v_full[i], mask, self.scale))
            start += ql
        return torch.cat(outs).float()


@pytest.mark.parametrize("h,hkv", [(6, 2), (4, 4), (9, 3)])
def test_decode_fast_path_matches_general_and_naive(h, hkv):
    sc = Scenario([9, 1, 17, 4, 12], [1] * 5, h=h, hkv=hkv)
    assert sc.md.is_pure_decode
    out = sc.run()
    torch.testing.assert_close(out, sc.reference(), rtol=1e-5, atol=1e-5)
    # the per-request path on the same (already written) cache
    general = torch.cat([TorchAttentionBackend._one_request(sc.q, sc.k, sc.v, sc.key_cache, sc.value_cache,
                                                            sc.md, i, sc.scale) for i in range(5)])
    torch.testing.assert_close(out, general, rtol=1e-5, atol=1e-5)
    # new K/V landed in the cache at the slots
    flat = sc.key_cache.view(-1, hkv, sc.k.shape[-1])
    torch.testing.assert_close(flat[sc.md.slot_mapping], sc.k)


def test_mixed_batch_prefill_chunk_fresh_prompt_and_decode():
    # request 0: second prefill chunk (5 cached + 6 new), 1: whole prompt, 2-3: decode
    sc = Scenario([11, 7, 13, 2], [6, 7, 1, 1])
    assert not sc.md.is_pure_decode
    torch.testing.assert_close(sc.run(), sc.reference(), rtol=1e-5, atol=1e-5)


def test_tree_mask_is_honored():
    # 5 tree tokens after a 7-token prefix: 0 is the root, 1 and 2 its children, 3 child of 1, 4 child of 2
    anc = TokenTree(range(5), [-1, 0, 0, 1, 2]).ancestor_mask()
    sc = Scenario([12, 5], [5, 1], tree_masks=[anc, None])
    assert not sc.md.is_pure_decode
    out = sc.run()
    torch.testing.assert_close(out, sc.reference(), rtol=1e-5, atol=1e-5)
    # a token must not see its sibling branch: perturbing token 2's K/V leaves tokens 1 and 3 alone
    sc2 = Scenario([12, 5], [5, 1], tree_masks=[anc, None])
    sc2.k[2] += 5.0
    sc2.v[2] -= 3.0
    out2 = sc2.run()
    torch.testing.assert_close(out2[[0, 1, 3]], out[[0, 1, 3]])
    assert not torch.allclose(out2[[2, 4]], out[[2, 4]])


def test_writes_land_before_reads_for_shared_prefix_blocks():
    # Request 0 prefills 8 tokens into blocks [3, 5]; request 1 shares those blocks as its prefix
    # and queries tokens 8..9 in block 9 -- in the same call, so it must see request 0's writes.
    g = torch.Generator().manual_seed(1)
    h, hkv, d = 4, 2, 8
    k_pre, v_pre = torch.randn(8, hkv, d, generator=g), torch.randn(8, hkv, d, generator=g)
    k_new, v_new = torch.randn(2, hkv, d, generator=g), torch.randn(2, hkv, d, generator=g)
    q = torch.randn(10, h, d, generator=g)
    md = make_md([8, 10], [8, 2], [[3, 5], [3, 5, 9]])
    md.slot_mapping = torch.tensor([12, 13, 14, 15, 20, 21, 22, 23, 36, 37])
    kc, vc = torch.zeros(12, BS, hkv, d), torch.zeros(12, BS, hkv, d)
    out = TorchAttentionBackend().forward(q, torch.cat([k_pre, k_new]), torch.cat([v_pre, v_new]),
                                          kc, vc, md, d ** -0.5)
    k_ctx, v_ctx = torch.cat([k_pre, k_new]), torch.cat([v_pre, v_new])
    mask = torch.arange(10)[None, :] <= (8 + torch.arange(2))[:, None]
    torch.testing.assert_close(out[8:], naive(q[8:], k_ctx, v_ctx, mask, d ** -0.5).float(),
                               rtol=1e-5, atol=1e-5)


def test_bf16_and_empty_requests():
    sc = Scenario([6, 3, 9], [2, 0, 1])   # a request with no tokens this step is skipped
    out = TorchAttentionBackend().forward(sc.q.bfloat16(), sc.k.bfloat16(), sc.v.bfloat16(),
                                          sc.key_cache.bfloat16(), sc.value_cache.bfloat16(), sc.md, sc.scale)
    assert out.dtype == torch.bfloat16 and out.shape == sc.q.shape
    torch.testing.assert_close(out.float(), sc.reference(), rtol=3e-2, atol=3e-2)


def test_get_attention_backend():
    assert isinstance(get_attention_backend("cpu"), TorchAttentionBackend)


def test_one_backend_reused_across_steps_and_shapes():
    """The decode gather buffers are reused: growing, shrinking and changing head shape."""
    be = TorchAttentionBackend()
    for seq_lens, h, hkv in [([5, 9], 4, 2), ([30, 17, 22, 3], 4, 2), ([6], 6, 3), ([40, 2], 4, 2)]:
        sc = Scenario(seq_lens, [1] * len(seq_lens), h=h, hkv=hkv, num_blocks=48)
        be.prepare(sc.md)
        out = be.forward(sc.q, sc.k, sc.v, sc.key_cache, sc.value_cache, sc.md, sc.scale)
        torch.testing.assert_close(out, sc.reference(), rtol=1e-5, atol=1e-5)

import math

import pytest
import torch

from spruce.engine import sampler as sampler_mod
from spruce.engine.sampler import Sampler, SamplingMetadata
from spruce.request import Request
from spruce.sampling_params import SamplingParams

EOS = 2


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)  # empirical checks use the default generator: keep them reproducible


def req(prompt=(5, 6, 7), output=(), eos=EOS, rid="r", **kw):
    r = Request(rid, list(prompt), SamplingParams(**kw), eos_token_id=eos)
    r.append_output_token_ids(list(output))
    return r


def sample(logits, requests, **md_kw):
    md = SamplingMetadata.from_requests(requests, logits.shape[-1], "cpu", **md_kw)
    return Sampler()(logits.clone(), md)  # the sampler works in place


def freqs(tokens, V):
    return torch.bincount(tokens, minlength=V).float() / tokens.numel()


def empirical(logits_row, n=20000, **kw):
    """n independent draws from one row's settings, done as one batch of n identical rows."""
    r = req(**kw)
    out = sample(logits_row.expand(n, -1), [r] * n)
    return freqs(out.sampled_token_ids, logits_row.numel())


def test_greedy_is_argmax():
    logits = torch.randn(6, 100)
    out = sample(logits, [req(temperature=0.0, rid=str(i)) for i in range(6)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.sampled_token_ranks is None


def test_all_greedy_fast_path_skips_random_sampling(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("random sampling ran for an all-greedy batch")
    monkeypatch.setattr(Sampler, "_sample", staticmethod(boom))
    md = SamplingMetadata.from_requests([req(temperature=0.0)] * 3, 10, "cpu")
    assert md.no_penalties and md.top_k is None and md.top_p is None and md.min_p is None
    Sampler()(torch.randn(3, 10), md)


def test_temperature_matches_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    for t in (0.5, 1.0, 2.0):
        want = torch.softmax(logits / t, -1)
        assert (empirical(logits, temperature=t) - want).abs().max() < 0.02


def test_top_k_support_and_renormalized():
    logits = torch.tensor([0.5, 2.0, 1.0, 1.5, -1.0, 0.0])
    got = empirical(logits, top_k=3)
    allowed = torch.tensor([1, 2, 3])
    assert got[[0, 4, 5]].sum() == 0
    want = torch.zeros(6)
    want[allowed] = torch.softmax(logits[allowed], -1)
    assert (got - want).abs().max() < 0.02


def test_draw_never_leaves_the_support_at_the_vocab_edges():
    # Inverse-CDF edge cases: the only live tokens sit first and last in a large vocabulary.
    V, n = 49152, 2000
    logits = torch.full((V,), float("-inf"))
    logits[0] = logits[V - 1] = 0.0
    got = sample(logits.expand(n, -1), [req()] * n).sampled_token_ids
    assert set(got.tolist()) <= {0, V - 1} and 0.4 < (got == 0).float().mean() < 0.6


def test_top_p_support_and_renormalized():
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3]).log()
    got = empirical(logits, top_p=0.6)  # smallest set reaching 0.6: {0.4, 0.3}
    assert got[0] == 0 and got[2] == 0
    assert abs(got[1] - 4 / 7) < 0.02 and abs(got[3] - 3 / 7) < 0.02


def test_min_p_support_and_renormalized():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    got = empirical(logits, min_p=0.2)  # cut-off 0.2 * 0.5 = 0.1
    assert got[0] == 0
    want = torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95
    assert (got - want).abs().max() < 0.02


def test_top_k_and_top_p_together():
    logits = torch.tensor([0.05, 0.35, 0.1, 0.25, 0.25]).log()
    # top_k=3 keeps {.35, .25, .25} (renormalized .41, .29, .29); top_p=0.5 then keeps .41 + one .29
    got = empirical(logits, top_k=3, top_p=0.5)
    assert got[0] == 0 and got[2] == 0 and (got[3] == 0) != (got[4] == 0)
    assert abs(got[1] - 0.35 / 0.6) < 0.02


def test_mixed_batch_each_row_keeps_its_settings():
    torch.manual_seed(1)
    V, n = 12, 4000
    base = torch.randn(V)
    kinds = [dict(temperature=0.0), dict(top_k=2), dict(top_p=0.3, temperature=0.7),
             dict(min_p=0.5), dict(temperature=1.3)]
    reqs = [req(rid=str(j), **kw) for j, kw in enumerate(kinds)]
    rows = [reqs[j] for j in range(len(kinds)) for _ in range(n)]
    toks = sample(base.expand(len(rows), -1), rows).sampled_token_ids.view(len(kinds), n)
    order = base.argsort(descending=True)
    assert (toks[0] == order[0]).all()
    assert set(toks[1].tolist()) == set(order[:2].tolist())
    probs = torch.softmax(base / 0.7, -1)[order]
    keep = int((probs.cumsum(0) < 0.3).sum()) + 1
    assert set(toks[2].tolist()) <= set(order[:keep].tolist())
    p = torch.softmax(base, -1)
    assert set(toks[3].tolist()) == set((p >= 0.5 * p.max()).nonzero().flatten().tolist())
    assert (freqs(toks[4], V) - torch.softmax(base / 1.3, -1)).abs().max() < 0.03


@pytest.mark.parametrize("me_kw", [{}, dict(top_p=0.8, temperature=0.7, repetition_penalty=1.2)])
def test_seeded_rows_independent_of_batch(me_kw):
    V, steps = 1000, 6  # V > 512: top-p takes the CPU candidate path
    step_logits = [torch.randn(V) for _ in range(steps)]

    def run(seed, batch_size, position, other_seed=None):
        me = req(seed=seed, rid="me", **me_kw)
        toks = []
        for s in range(steps):
            others = [req(rid=f"o{i}", seed=other_seed and other_seed + i, temperature=i % 3 * 0.7,
                          top_k=i % 4, top_p=0.5 if i % 2 else 1.0, min_p=0.01 * (i % 3))
                      for i in range(batch_size - 1)]
            rows = others[:position] + [me] + others[position:]
            logits = torch.randn(batch_size, V) * 3
            logits[position] = step_logits[s]
            toks.append(int(sample(logits, rows).sampled_token_ids[position]))
            me.append_output_token_ids(toks[-1:])
        return toks

    ref = run(7, 1, 0)
    assert run(7, 5, 3) == ref
    assert run(7, 9, 0, other_seed=100) == ref
    assert run(7, 4, 2, other_seed=7) == ref  # another request with the same seed doesn't interfere
    assert run(8, 1, 0) != ref


def test_seeded_distribution_still_correct():
    logits = torch.tensor([1.0, 0.0, -1.0])
    r = req(seed=3)
    toks = torch.stack([sample(logits[None], [r]).sampled_token_ids[0] for _ in range(3000)])
    assert (freqs(toks, 3) - torch.softmax(logits, -1)).abs().max() < 0.04


def test_penalties_match_reference():
    torch.manual_seed(3)
    V = 20
    logits = torch.randn(3, V) * 2
    prompt, output = [1, 3, 3, 4], [4, 5, 5, 5, 9]
    settings = [dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7),
                dict(), dict(frequency_penalty=-0.5)]
    reqs = [req(prompt=prompt, output=output, rid=str(i), temperature=0.0, **kw)
            for i, kw in enumerate(settings)]
    md = SamplingMetadata.from_requests(reqs, V, "cpu")
    got = logits.clone()
    Sampler._apply_bias_and_penalties(got, md)

    want = logits.clone()
    for row, kw in enumerate(settings):
        rp, fp, pp = kw.get("repetition_penalty", 1.0), kw.get("frequency_penalty", 0.0), \
            kw.get("presence_penalty", 0.0)
        for t in range(V):
            x = want[row, t].item()
            if t in prompt or t in output:
                x = x / rp if x > 0 else x * rp
            c = output.count(t)
            x -= fp * c + pp * (c > 0)
            want[row, t] = x
    torch.testing.assert_close(got, want)
    # Penalties apply under greedy too (vLLM).
    assert torch.equal(Sampler()(logits, md).sampled_token_ids, want.argmax(-1))


def test_rows_with_own_histories():
    """Speculative rows: one request, several rows, each with a hypothetical history."""
    V = 8
    r = req(prompt=[0], frequency_penalty=2.0, temperature=0.0, min_tokens=2)
    logits = torch.zeros(2, V)
    logits[:, 3] = 1.0
    logits[:, EOS] = 5.0
    out = sample(logits, [r, r], output_token_ids=[[3], [1, 3, 3]])
    # row 0: 1 token < min_tokens, EOS banned, 3 penalized to -1 -> some zero-logit token
    assert out.sampled_token_ids[0] not in (EOS, 3)
    assert out.sampled_token_ids[1] == EOS


def test_logit_bias():
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0]] * 2)
    reqs = [req(temperature=0.0, logit_bias={2: 10.0}, rid="a"),
            req(temperature=0.0, logit_bias={0: -100.0, 1: -100.0}, rid="b")]
    assert sample(logits, reqs).sampled_token_ids.tolist() == [2, 2]
    got = empirical(torch.tensor([0.0, 0.0, 0.0]), n=5000, logit_bias={1: -100.0})
    assert got[1] == 0


def test_min_tokens_blocks_eos_and_stop_ids():
    V = 10
    logits = torch.zeros(4, V)
    logits[:, EOS], logits[:, 7], logits[:, 5] = 9.0, 8.0, 7.0
    reqs = [req(min_tokens=3, output=[1], stop_token_ids=[7], temperature=0.0, rid="a"),
            req(min_tokens=3, output=[1, 1, 1], stop_token_ids=[7], temperature=0.0, rid="b"),
            req(min_tokens=3, output=[1], stop_token_ids=[7], ignore_eos=True, temperature=0.0, rid="c"),
            req(min_tokens=3, output=[1], stop_token_ids=[7], rid="d")]
    assert sample(logits, reqs).sampled_token_ids[:3].tolist() == [5, EOS, EOS]
    got = empirical(logits[3], n=3000, min_tokens=3, output=[1], stop_token_ids=[7])
    assert got[EOS] == 0 and got[7] == 0


def test_logprobs_are_raw_and_sorted():
    torch.manual_seed(4)
    V = 50
    logits = torch.randn(3, V)
    reqs = [req(logprobs=5, temperature=0.3, logit_bias={0: 50.0}, rid="a"),
            req(logprobs=2, temperature=0.0, rid="b"),
            req(rid="c")]
    out = sample(logits, reqs)
    raw = torch.log_softmax(logits, -1)
    ids, lps = out.logprobs
    assert ids.shape == (3, 6) and lps.shape == (3, 6) and ids.dtype == torch.long
    assert out.sampled_token_ids[0] == 0  # the bias drives sampling, not the reported logprobs
    torch.testing.assert_close(lps[:, 0], raw.gather(1, out.sampled_token_ids[:, None])[:, 0])
    assert torch.equal(ids[:, 0], out.sampled_token_ids)
    top = raw.topk(5, -1)
    assert torch.equal(ids[:, 1:], top.indices)
    torch.testing.assert_close(lps[:, 1:], top.values)
    assert (lps[:, 1:].diff(dim=1) <= 0).all()
    want_rank = (raw > raw.gather(1, out.sampled_token_ids[:, None])).sum(-1) + 1
    assert torch.equal(out.sampled_token_ranks, want_rank)
    assert out.sampled_token_ranks[1] == 1
    ids, lps, rank = out.row_logprobs(1, 2)
    assert len(ids) == len(lps) == 3 and rank == 1 and ids[0] == ids[1]
    assert math.isclose(lps[0], raw[1].max().item(), rel_tol=1e-5)


def test_logprobs_zero_gives_sampled_only():
    out = sample(torch.randn(2, 30), [req(logprobs=0, rid="a"), req(rid="b")])
    ids, lps = out.logprobs
    assert ids.shape == lps.shape == (2, 1)
    assert torch.equal(ids[:, 0], out.sampled_token_ids)


def test_partial_top_p_matches_full_sort():
    """The CPU path searches the nucleus among the best 512 tokens; it must equal vLLM's sort."""
    V = 3000
    scales = [8.0, 3.0, 1.0, 0.05, 0.05, 2.0, 0.05, 4.0]  # 0.05: nearly flat, nucleus > 512
    logits = torch.randn(len(scales), V) * torch.tensor(scales)[:, None]
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.9, 1.0, 1.0, 0.3, 0.99])[:, None]
    top_k = torch.tensor([0, 0, 40, 0, 700, 100, 2000, 600])
    for k in (None, top_k):
        got = sampler_mod._top_k_top_p_partial(logits.clone(), k, top_p)
        want = sampler_mod._top_k_top_p_sorted(logits.clone(), k, top_p).softmax(-1)
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got / got.sum(-1, keepdim=True), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtypes_and_shapes(dtype):
    logits = torch.randn(5, 40).to(dtype)
    reqs = [req(rid=str(i), temperature=i * 0.5, top_k=i, repetition_penalty=1 + i / 10, output=[i])
            for i in range(5)]
    out = sample(logits, reqs)
    assert out.sampled_token_ids.shape == (5,) and out.sampled_token_ids.dtype == torch.long
    assert out.sampled_token_ids[0] == logits[0].float().argmax()

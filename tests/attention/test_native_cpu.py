"""The native CPU paged-attention op and backend against TorchAttentionBackend.

Where a C++ compiler exists (CI has one) the op must build: these tests fail rather than skip if
it does not, so a broken build cannot pass as "skipped".
"""
import random

import pytest
import torch

from spruce.attention import _build
from spruce.attention.backend import get_attention_backend
from spruce.attention.metadata import AttentionMetadata
from spruce.attention.torch_ref import TorchAttentionBackend
from spruce.spec.tree import TokenTree
from tests.paged_runner import PagedRunner


@pytest.fixture
def native(ops):
    from spruce.attention.native_cpu import NativeCPUAttentionBackend
    return NativeCPUAttentionBackend(ops)


@pytest.fixture
def scalar(ops):
    ops.set_force_scalar(True)
    yield
    ops.set_force_scalar(False)


@pytest.fixture
def threads():
    """Run with n threads (more than the cores is fine) and restore."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


class Batch:
    """A flat batch over a paged cache of random K/V with non-contiguous, shuffled block tables.

    The cache already holds every request's context before this step; k/v are this step's new
    tokens, which forward() writes at slot_mapping before attending."""

    def __init__(self, seq_lens, query_lens, h, hkv, d, bs=16, dtype=torch.float32, seed=0,
                 tree_masks=None):
        g = torch.Generator().manual_seed(seed)
        nbs = [(s + bs - 1) // bs for s in seq_lens]
        num_blocks = sum(nbs) + 7
        perm = torch.randperm(num_blocks, generator=g).tolist()
        tables = []
        for n in nbs:
            tables.append(perm[:n])
            perm = perm[n:]
        width = max(nbs) + 2   # padding past every request's last block
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        slots = [tables[i][p // bs] * bs + p % bs
                 for i, (s, q) in enumerate(zip(seq_lens, query_lens)) for p in range(s - q, s)]
        self.md = AttentionMetadata(
            num_tokens=qsl[-1], query_start_loc=qsl, seq_lens=list(seq_lens),
            query_lens=list(query_lens), block_tables=bt, slot_mapping=torch.tensor(slots),
            block_size=bs, seq_lens_t=torch.tensor(seq_lens), tree_masks=tree_masks)
        t = qsl[-1]
        self.key_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
        self.value_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
        # Slightly peaked scores so softmax is not uniform.
        self.q = (2 * torch.randn(t, h, d, generator=g)).to(dtype)
        self.k = torch.randn(t, hkv, d, generator=g).to(dtype)
        self.v = torch.randn(t, hkv, d, generator=g).to(dtype)
        self.scale = d ** -0.5

    def run(self, backend):
        kc, vc = self.key_cache.clone(), self.value_cache.clone()
        backend.prepare(self.md)
        out = backend.forward(self.q, self.k, self.v, kc, vc, self.md, self.scale)
        return out, kc, vc

    def op_inputs(self):
        """Caches with this step's K/V written, for calling the op directly."""
        kc, vc = self.key_cache.clone(), self.value_cache.clone()
        TorchAttentionBackend.write_kv(self.k, self.v, kc, vc, self.md.slot_mapping)
        return kc, vc

    def run_op(self, ops, varlen=False, q=None):
        """The op called directly (decode or varlen) into a NaN-filled output."""
        kc, vc = self.op_inputs()
        q = self.q if q is None else q
        out = torch.full(self.q.shape, float("nan"), dtype=q.dtype)
        if varlen:
            ops.paged_attention_varlen(out, q, kc, vc, self.md.block_tables, self.md.seq_lens_t,
                                       torch.tensor(self.md.query_start_loc), self.scale)
        else:
            ops.paged_attention_decode(out, q, kc, vc, self.md.block_tables, self.md.seq_lens_t,
                                       self.scale)
        return out


def assert_op_matches_torch(ops, b: "Batch", varlen=False):
    ref = b.run(TorchAttentionBackend())[0]
    torch.testing.assert_close(b.run_op(ops, varlen), ref, atol=1e-5, rtol=1e-5)


def assert_matches_torch(b: Batch, backend, atol=1e-5, rtol=1e-5):
    ref, kref, vref = b.run(TorchAttentionBackend())
    out, kc, vc = b.run(backend)
    assert out.dtype == b.q.dtype and out.shape == b.q.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(kc, kref, atol=0, rtol=0)
    torch.testing.assert_close(vc, vref, atol=0, rtol=0)
    return out


# Lengths at and around block boundaries (16), a single token, and long contexts.
EDGE_LENS = [1, 2, 15, 16, 17, 31, 32, 33, 64, 300, 317, 513]


def decode_lens(batch):
    if batch == 1:
        return [317]
    rng = random.Random(batch)
    return EDGE_LENS + [rng.randint(1, 400) for _ in range(batch - len(EDGE_LENS))]


# ---- the op itself -----------------------------------------------------------------------------

@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("h,hkv", [(4, 4), (9, 3), (8, 2)])   # GQA groups 1, 3, 4
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_op_matches_torch(ops, batch, h, hkv, d):
    b = Batch(decode_lens(batch), [1] * batch, h, hkv, d, seed=batch + h + d)
    assert_op_matches_torch(ops, b)


@pytest.mark.parametrize("d", [64, 36])
def test_decode_op_portable_kernel(ops, scalar, d):
    b = Batch(decode_lens(24), [1] * 24, 9, 3, d, bs=4, seed=7)
    assert_op_matches_torch(ops, b)


def test_head_dim_off_the_vector_width(ops):
    # 36 is not a multiple of 8 lanes: the op takes its portable kernel by itself
    b = Batch([30, 1, 17], [2, 1, 17], 6, 2, 36, seed=13)
    assert_op_matches_torch(ops, b, varlen=True)


def test_odd_block_size_and_head_dim_avx2(ops):
    # block_size 5: 8-token tiles straddle blocks; head_dim 40 is 5 lanes of 8 (no 32-wide chunk)
    b = Batch(decode_lens(20), [1] * 20, 6, 2, 40, bs=5, seed=3)
    assert_op_matches_torch(ops, b)


def test_long_context_is_split_across_threads(ops, threads):
    # One request, 3 KV heads: too few items for 4 threads, so the context is partitioned and
    # the partitions merged by log-sum-exp (flash-decoding).
    threads(4)
    b = Batch([3001, 1200], [1, 1], 9, 3, 64, seed=11)
    assert_op_matches_torch(ops, b)
    # a long chunked-prefill tile whose later partitions lie past some of its queries
    b = Batch([2500], [5], 8, 2, 64, seed=12)
    assert_op_matches_torch(ops, b, varlen=True)


def test_single_thread_matches(ops, threads):
    threads(1)
    b = Batch(decode_lens(64), [1] * 64, 9, 3, 64, seed=5)
    assert_op_matches_torch(ops, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_op_reduced_precision(ops, dtype):
    """Caches and q in bf16/fp16: the op converts to fp32 and accumulates there, so it should sit
    at least as close to an fp64 reference as the torch backend's bf16 SDPA does."""
    b = Batch(decode_lens(64), [1] * 64, 9, 3, 64, dtype=dtype, seed=9)
    ref, _, _ = b.run(TorchAttentionBackend())
    out = b.run_op(ops)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # fp64 over the same (rounded) inputs
    exact = b.run(_Float64Backend())[0]
    err_native = (out.double() - exact).abs().max().item()
    err_torch = (ref.double() - exact).abs().max().item()
    assert err_native <= err_torch + 1e-3, (err_native, err_torch)


class _Float64Backend(TorchAttentionBackend):
    """The torch backend run in float64 on upcast copies: an exact reference."""

    def forward(self, q, k, v, key_cache, value_cache, md, scale):
        self.write_kv(k, v, key_cache, value_cache, md.slot_mapping)
        return super().forward(q.double(), k.double(), v.double(), key_cache.double(),
                               value_cache.double(), md, scale)


def test_mixed_precision_q_out(ops):
    # fp32 caches with a bf16 q and an fp32 out: each side converted on its own
    b = Batch([40, 7], [1, 1], 4, 2, 64, seed=2)
    kc, vc = b.op_inputs()
    ref = torch.empty_like(b.q)
    ops.paged_attention_decode(ref, b.q.bfloat16().float(), kc, vc, b.md.block_tables,
                               b.md.seq_lens_t, b.scale)
    out = torch.empty_like(b.q)
    ops.paged_attention_decode(out, b.q.bfloat16(), kc, vc, b.md.block_tables, b.md.seq_lens_t,
                               b.scale)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (8, 2, 128), (4, 4, 64)])
def test_varlen_op_mixed_batch(ops, h, hkv, d):
    # chunk after cached context, whole prompt, decodes, a long chunk, an idle request
    seq_lens = [45, 20, 300, 1, 33, 700, 12]
    query_lens = [13, 20, 1, 1, 0, 300, 12]
    b = Batch(seq_lens, query_lens, h, hkv, d, seed=h * d)
    assert_op_matches_torch(ops, b, varlen=True)


def test_op_accepts_strided_q(ops):
    # The model hands q as a view into its fused q|k buffer: rows strided, head_dim contiguous.
    b = Batch(decode_lens(16), [1] * 16, 9, 3, 64, seed=4)
    ref = b.run(TorchAttentionBackend())[0]
    qk = torch.cat([b.q, torch.randn(16, 3, 64)], dim=1)
    torch.testing.assert_close(b.run_op(ops, q=qk[:, :9]), ref, atol=1e-5, rtol=1e-5)


def test_op_rejects_bad_input(ops):
    b = Batch([20, 5], [1, 1], 4, 2, 64)
    kc, vc = b.op_inputs()
    out = torch.empty_like(b.q)
    bad = b.md.block_tables.clone()
    bad[0, 1] = kc.shape[0]          # a block id past the cache
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_attention_decode(out, b.q, kc, vc, bad, b.md.seq_lens_t, b.scale)
    with pytest.raises(RuntimeError, match="needs"):
        ops.paged_attention_decode(out, b.q, kc, vc, b.md.block_tables[:, :1],
                                   b.md.seq_lens_t, b.scale)
    with pytest.raises(RuntimeError, match="multiple"):
        ops.paged_attention_decode(out[:, :3], b.q[:, :3], kc, vc, b.md.block_tables,
                                   b.md.seq_lens_t, b.scale)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_attention_decode(out, b.q, kc, vc, b.md.block_tables.int(),
                                   b.md.seq_lens_t, b.scale)


# ---- the backend -------------------------------------------------------------------------------

@pytest.mark.parametrize("h,hkv", [(4, 4), (9, 3), (8, 2)])
def test_backend_decode(native, h, hkv):
    assert_matches_torch(Batch(decode_lens(64), [1] * 64, h, hkv, 64, seed=h), native)


def test_backend_mixed_batch_with_tree_masks(native):
    anc = TokenTree(range(5), [-1, 0, 0, 1, 2]).ancestor_mask()
    seq_lens, query_lens = [30, 12, 50, 7, 9], [5, 1, 10, 7, 0]
    trees = [anc, None, None, None, None]
    b = Batch(seq_lens, query_lens, 9, 3, 64, tree_masks=trees, seed=8)
    assert not b.md.is_pure_decode
    assert_matches_torch(b, native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_others", [False, True])
def test_fresh_prefills_run_through_sdpa(ops, dtype, with_others):
    """Whole-prompt prefills of at least sdpa_min_tokens go to torch's SDPA on the batch's own
    K/V; decodes, chunk continuations and short prompts in the same batch go to the op."""
    from spruce.attention.native_cpu import NativeCPUAttentionBackend
    native = NativeCPUAttentionBackend(ops, sdpa_min_tokens=32)
    seq_lens, query_lens = [32, 200], [32, 200]
    if with_others:   # a decode, a chunk continuation, a short whole prompt, between the fresh ones
        seq_lens = [32, 57, 90, 5, 200]
        query_lens = [32, 1, 40, 5, 200]
    b = Batch(seq_lens, query_lens, 9, 3, 64, dtype=dtype, seed=4)
    native.prepare(b.md)
    plan = b.md._native_plan
    assert plan.sdpa_reqs == (0, len(seq_lens) - 1)
    assert (plan.op_rows is not None) == with_others
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert_matches_torch(b, native, **tol)


def test_fresh_prefills_below_the_threshold_stay_in_the_op(ops, monkeypatch):
    from spruce.attention import native_cpu
    monkeypatch.delenv("SPRUCE_SDPA_MIN_TOKENS", raising=False)
    expect = native_cpu.SDPA_MIN_TOKENS_AMX if ops.amx_available() else native_cpu.SDPA_MIN_TOKENS_NO_AMX
    assert native_cpu.default_sdpa_min_tokens(ops) == expect
    monkeypatch.setenv("SPRUCE_SDPA_MIN_TOKENS", "64")
    native = native_cpu.NativeCPUAttentionBackend(ops)
    assert native.sdpa_min_tokens == 64
    b = Batch([63, 64, 200], [63, 64, 200], 9, 3, 64, seed=5)
    native.prepare(b.md)
    assert b.md._native_plan.sdpa_reqs == (1, 2)
    assert_matches_torch(b, native)


_WIDE = TokenTree(range(7), [-1, 0, 0, 0, 1, 2, 3]).ancestor_mask()   # 3 branches of 2
_CHAIN = TokenTree(range(4), [-1, 0, 1, 2]).ancestor_mask()
_DEEP = TokenTree(range(6), [-1, 0, 0, 1, 2, 3]).ancestor_mask()


@pytest.mark.parametrize("batch", [
    # trees beside decodes and a prefill chunk
    ([40, 12, 1300, 50, 9, 600], [7, 1, 4, 10, 6, 1], [_WIDE, None, _CHAIN, None, _DEEP, None]),
    # one tree over a context long enough to be split across threads (partitions merged after)
    ([1300], [7], [_WIDE]),
])
@pytest.mark.parametrize("force_scalar", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_tree_masks_run_in_the_op(native, monkeypatch, batch, force_scalar, threads):
    """Trees are masked inside the op; the torch per-request path is the reference here and is
    never called by the native backend."""
    seq_lens, query_lens, trees = batch
    b = Batch(seq_lens, query_lens, 9, 3, 64, tree_masks=trees, seed=11)
    ref = b.run(TorchAttentionBackend())[0]
    monkeypatch.setattr(native, "_one_request", lambda *a, **k: pytest.fail("tree fell back to torch"))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    native.ops.set_force_scalar(force_scalar)
    try:
        out = b.run(native)[0]
    finally:
        native.ops.set_force_scalar(False)
        torch.set_num_threads(old)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_tree_mask_of_the_wrong_shape_falls_back(native):
    anc = TokenTree(range(3), [-1, 0, 0]).ancestor_mask()
    b = Batch([20, 8], [3, 4], 4, 2, 64, tree_masks=[anc, anc], seed=2)   # 4 query tokens, 3x3 mask
    native.prepare(b.md)
    plan = b.md.__dict__["_native_plan"]
    assert plan.torch_tree_reqs == (1,) and plan.tree_mask_offsets.tolist() == [0, -1]


def test_op_rejects_a_tree_mask_out_of_range(ops):
    b = Batch([20, 8], [3, 1], 4, 2, 64, seed=3)
    kc, vc = b.op_inputs()
    out = torch.empty_like(b.q)
    with pytest.raises(RuntimeError, match="outside tree_mask"):
        ops.paged_attention_varlen(out, b.q, kc, vc, b.md.block_tables, b.md.seq_lens_t,
                                   torch.tensor(b.md.query_start_loc), b.scale,
                                   torch.ones(8, dtype=torch.bool), torch.tensor([0, -1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_reduced_precision(native, dtype):
    b = Batch([33, 100, 7], [1, 20, 7], 9, 3, 64, dtype=dtype, seed=1)
    assert_matches_torch(b, native, atol=3e-2, rtol=3e-2)


def test_backend_reuses_metadata_across_steps(native):
    """The engine may hand one metadata object to every step; prepare() must rebuild."""
    torch_be = TorchAttentionBackend()
    b = Batch([20, 5], [3, 1], 4, 2, 64, seed=6)
    md = b.md
    for seq_lens, qlens in [([20, 5], [3, 1]), ([21, 6], [1, 1]), ([22, 7], [1, 1])]:
        nb = Batch(seq_lens, qlens, 4, 2, 64, seed=sum(seq_lens))
        for f in ("num_tokens", "query_start_loc", "seq_lens", "query_lens", "block_tables",
                  "slot_mapping", "block_size", "seq_lens_t"):
            setattr(md, f, getattr(nb.md, f))
        nb.md = md
        ref = nb.run(torch_be)[0]
        torch.testing.assert_close(nb.run(native)[0], ref, atol=1e-5, rtol=1e-5)


def test_backend_falls_back_for_unsupported_cache(native):
    b = Batch([10, 4], [1, 1], 4, 2, 8, dtype=torch.float64)
    ref = b.run(TorchAttentionBackend())[0]
    torch.testing.assert_close(b.run(native)[0], ref)


def test_get_attention_backend_choice(ops, monkeypatch):
    from spruce.attention.native_cpu import NativeCPUAttentionBackend
    monkeypatch.delenv("SPRUCE_ATTENTION_BACKEND", raising=False)
    assert isinstance(get_attention_backend("cpu"), NativeCPUAttentionBackend)
    monkeypatch.setenv("SPRUCE_ATTENTION_BACKEND", "torch")
    be = get_attention_backend("cpu")
    assert type(be) is TorchAttentionBackend
    monkeypatch.setenv("SPRUCE_ATTENTION_BACKEND", "native")
    assert isinstance(get_attention_backend("cpu"), NativeCPUAttentionBackend)
    monkeypatch.setenv("SPRUCE_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError):
        get_attention_backend("cpu")


def test_build_failure_falls_back_to_torch(ops, monkeypatch, tmp_path, caplog):
    """A failing build logs one warning and yields None; the selector then picks torch."""
    monkeypatch.setattr(_build, "_loaded", False)
    monkeypatch.setattr(_build, "_ops", None)
    monkeypatch.setattr(_build, "_error", None)
    monkeypatch.setenv("SPRUCE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.delenv("SPRUCE_ATTENTION_BACKEND", raising=False)
    with caplog.at_level("WARNING", logger="spruce.attention._build"):
        assert _build.load_native_ops() is None
        assert _build.load_native_ops() is None     # tried once
    assert len(caplog.records) == 1 and "torch backend" in caplog.records[0].getMessage()
    assert type(get_attention_backend("cpu")) is TorchAttentionBackend
    monkeypatch.setenv("SPRUCE_ATTENTION_BACKEND", "native")
    with pytest.raises(RuntimeError, match="unavailable"):
        get_attention_backend("cpu")


def test_compile_error_falls_back(ops, monkeypatch, tmp_path, caplog):
    bad = tmp_path / "broken.cpp"
    bad.write_text("#error deliberately broken\n")
    monkeypatch.setattr(_build, "_loaded", False)
    monkeypatch.setattr(_build, "_ops", None)
    monkeypatch.setattr(_build, "_error", None)
    monkeypatch.setattr(_build, "SOURCES", [bad])
    monkeypatch.setenv("SPRUCE_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="spruce.attention._build"):
        assert _build.load_native_ops(announce=False) is None
    assert len(caplog.records) == 1
    assert "deliberately broken" in _build.load_error()


def test_build_directory_is_keyed(monkeypatch, tmp_path):
    monkeypatch.setenv("SPRUCE_CACHE_DIR", str(tmp_path))
    a = _build.build_directory(["-O3"])
    assert a.parent == tmp_path / "ext"
    assert _build.build_directory(["-O2"]) != a


# ---- the whole model ---------------------------------------------------------------------------

def test_tiny_llama_logits_native_equal_torch(native):
    from spruce.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    models = {}
    for name, be in (("torch", TorchAttentionBackend()), ("native", native)):
        m = LlamaForCausalLM(cfg, torch.float32, "cpu", backend=be)
        models[name] = m
    with torch.no_grad():
        for p in models["torch"].parameters():
            p.copy_(0.15 * torch.randn_like(p) + (1.0 if p.dim() == 1 else 0.0))
        models["native"].load_state_dict(models["torch"].state_dict())

    prompts = {"a": list(range(3, 40)), "b": [5, 9, 2, 77, 1], "c": [11] * 17}
    # one step: all prompts; a second: a's prompt continues as a chunk while b and c decode;
    # then decode steps
    schedule = [{"a": prompts["a"][:20], "b": prompts["b"], "c": prompts["c"]},
                {"a": prompts["a"][20:], "b": [4], "c": [8]}]
    schedule += [{"a": [i], "b": [i + 1], "c": [i + 2]} for i in range(6)]
    logits = {}
    for name, model in models.items():
        run = PagedRunner(model, cfg)
        logits[name] = [run.step(chunks) for chunks in schedule]
    for a, b in zip(logits["torch"], logits["native"]):
        for rid in a:
            torch.testing.assert_close(b[rid], a[rid], atol=1e-4, rtol=1e-4)


def test_write_kv_matches_index_copy(ops, native):
    g = torch.Generator().manual_seed(7)
    kc, vc = torch.zeros(10, 4, 3, 8), torch.zeros(10, 4, 3, 8)
    qkv = torch.randn(6, 5 * 3 * 8, generator=g)       # k and v are row-strided views, as in the model
    k = qkv[:, 3 * 24:4 * 24].view(6, 3, 8)
    v = qkv[:, 4 * 24:].view(6, 3, 8)
    slots = torch.tensor([39, 0, 17, 5, 22, 38])
    native._write_kv(k, v, kc, vc, slots)
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    TorchAttentionBackend.write_kv(k, v, rk, rv, slots)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.write_kv(kc, vc, k, v, torch.tensor([0, 1, 2, 3, 4, 40]))
    # A dtype the op does not take goes through index_copy_ instead.
    kb, vb = torch.zeros(10, 4, 3, 8, dtype=torch.bfloat16), torch.zeros(10, 4, 3, 8, dtype=torch.bfloat16)
    native._write_kv(k, v, kb, vb, slots)
    assert torch.equal(kb, rk.bfloat16()) and torch.equal(vb, rv.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ctx", [37, 100, 301])      # context lengths off the 8-key groups
def test_a_query_gets_the_same_bits_alone_and_in_a_longer_chunk(ops, dtype, ctx):
    """Speculative verification runs the tree's queries as one chunk; plain decoding runs them one
    by one. Each query's attention output must not depend on which (so greedy speculation is
    lossless in bf16 too): key scores are summed in fixed groups of 8 keys and the softmax
    denominator in fp64, whatever the chunk's length."""
    g = torch.Generator().manual_seed(ctx)
    h, hkv, d, bs = 9, 3, 64, 16
    kc = torch.randn(32, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(32, bs, hkv, d, generator=g).to(dtype)
    table = torch.randperm(32, generator=g)[None]
    for ql in (2, 5, 13):
        q = torch.randn(ql, h, d, generator=g).to(dtype)
        chunk = torch.empty_like(q)
        ops.paged_attention_varlen(chunk, q, kc, vc, table, torch.tensor([ctx]), torch.tensor([0, ql]),
                                   d ** -0.5, None, None)
        for j in range(ql):
            alone = torch.empty(1, h, d, dtype=dtype)
            ops.paged_attention_decode(alone, q[j:j + 1].contiguous(), kc, vc, table,
                                       torch.tensor([ctx - ql + 1 + j]), d ** -0.5)
            assert torch.equal(alone[0], chunk[j]), (ql, j)

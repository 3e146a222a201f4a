"""The native skinny GEMM (spruce/csrc/skinny_gemm.cpp) and the linear dispatch against F.linear.

Like the attention op's tests, these fail rather than skip when a C++ compiler exists but the
extension does not build.
"""
import pytest
import torch
import torch.nn.functional as F

from spruce.models.linear import SkinnyCPULinear, TorchLinear, get_linear


@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (2, 64, 8), (3, 576, 1001), (4, 1536, 576),
                                   (7, 577, 33), (16, 576, 3072), (96, 64, 130), (1, 5, 3)])
@pytest.mark.parametrize("force_scalar", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_f_linear(ops, m, k, n, force_scalar, threads):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w, b = (torch.randn(*s, generator=g) for s in ((m, k), (n, k), (n,)))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            out = torch.full((m, n), float("nan"))
            ops.skinny_linear(out, x, w, bias, force_scalar)
            torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(old)


def test_strided_rows_and_output(ops):
    """x and out may be row-strided views (e.g. a slice of a wider buffer)."""
    x_buf, w = torch.randn(5, 80), torch.randn(24, 64)
    out_buf = torch.zeros(5, 40)
    x, out = x_buf[:, 8:72], out_buf[:, 4:28]
    ops.skinny_linear(out, x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert (out_buf[:, :4] == 0).all() and (out_buf[:, 28:] == 0).all()


def test_rejects_bad_input(ops):
    with pytest.raises(RuntimeError, match="float32"):
        ops.skinny_linear(torch.empty(1, 4), torch.randn(1, 8).bfloat16(), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="columns"):
        ops.skinny_linear(torch.empty(1, 4), torch.randn(1, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="out must be"):
        ops.skinny_linear(torch.empty(2, 4), torch.randn(1, 8), torch.randn(4, 8))


def test_dispatch_falls_back_outside_its_range(ops):
    lin = SkinnyCPULinear(ops, max_rows=4)
    calls = []
    real = ops.skinny_linear

    class Spy:
        def skinny_linear(self, *a):
            calls.append(a[1].shape)
            return real(*a)
    lin.ops = Spy()
    w = torch.randn(16, 8)
    for x in (torch.randn(4, 8), torch.randn(5, 8), torch.randn(2, 3, 8), torch.randn(2, 8).bfloat16(),
              torch.randn(8, 2).t(), torch.randn(3, 8, requires_grad=True)):
        ref = F.linear(x.float(), w)
        got = lin(x, w.to(x.dtype)) if x.dtype != torch.float32 else lin(x, w)
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)
    # Only the 2-D fp32 row-contiguous input within max_rows and outside autograd went native.
    assert calls == [(4, 8)]
    with torch.no_grad():
        lin(torch.randn(3, 8, requires_grad=True), w)
    assert calls == [(4, 8), (3, 8)]


def test_get_linear(monkeypatch, ops):
    monkeypatch.delenv("SPRUCE_LINEAR_BACKEND", raising=False)
    assert isinstance(get_linear("cpu", torch.float32), SkinnyCPULinear)
    assert isinstance(get_linear("cpu", torch.bfloat16), SkinnyCPULinear)
    assert type(get_linear("cpu", torch.float16)) is TorchLinear
    monkeypatch.setenv("SPRUCE_LINEAR_BACKEND", "torch")
    assert type(get_linear("cpu", torch.float32)) is TorchLinear
    monkeypatch.setenv("SPRUCE_LINEAR_BACKEND", "native")
    with pytest.raises(ValueError, match="float32 or bfloat16 model on CPU"):
        get_linear("cpu", torch.float16)
    monkeypatch.setenv("SPRUCE_LINEAR_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPRUCE_LINEAR_BACKEND"):
        get_linear("cpu", torch.float32)


# ---- block-quantized weights (quant_linear) ------------------------------------------------------

def _gguf_blocks(qtype_name: str, n: int, k: int, seed: int):
    """Random GGUF blocks of one type, and gguf-py's own dequantization of them."""
    import numpy as np
    gguf = pytest.importorskip("gguf")
    from spruce.models.quant import from_gguf_blocks
    qtype = gguf.GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    deq = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype)))
    return from_gguf_blocks(raw.reshape(-1), int(qtype), (n, k)), deq


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (2, 576, 962), (3, 64, 8), (5, 1536, 578), (16, 96, 33),
                                   (64, 32, 130)])
@pytest.mark.parametrize("force_scalar", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_quant_linear_is_bit_identical_to_the_dequantized_weight(ops, fmt, m, k, n, force_scalar, threads):
    q, w = _gguf_blocks(fmt, n, k, seed=m + k + n)
    assert torch.equal(q.dequantize(), w)    # the repacking keeps gguf-py's values
    x, b = torch.randn(m, k), torch.randn(n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            got, want = torch.full((m, n), float("nan")), torch.full((m, n), float("nan"))
            ops.quant_linear(got, x, q.format, q.qs, q.scale, q.min, bias, force_scalar)
            ops.skinny_linear(want, x, w, bias, force_scalar)
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(old)


def test_quant_weight_rows_and_bad_input(ops):
    from spruce.models.quant import QuantWeight
    a, wa = _gguf_blocks("Q4_1", 8, 64, seed=1)
    b, wb = _gguf_blocks("Q4_1", 4, 64, seed=2)
    assert torch.equal(QuantWeight.cat([a, b]).dequantize(), torch.cat([wa, wb]))
    perm = torch.tensor([3, 1, 0, 2, 7, 6, 5, 4])
    assert torch.equal(a.map_rows(lambda r: r[perm]).dequantize(), wa[perm])
    c, _ = _gguf_blocks("Q8_0", 8, 64, seed=3)
    with pytest.raises(ValueError, match="one format"):
        QuantWeight.cat([a, c])
    x, out = torch.randn(2, 64), torch.empty(2, 8)
    with pytest.raises(RuntimeError, match="needs min"):
        ops.quant_linear(out, x, a.format, a.qs, a.scale, None)
    with pytest.raises(RuntimeError, match="columns"):
        ops.quant_linear(out, torch.randn(2, 96), a.format, a.qs, a.scale, a.min)
    with pytest.raises(RuntimeError, match="scale must be"):
        ops.quant_linear(out, x, a.format, a.qs, a.scale[:, :1].contiguous(), a.min)
    with pytest.raises(RuntimeError, match="format"):
        ops.quant_linear(out, x, 7, a.qs, a.scale, a.min)


def test_dispatch_uses_a_registered_copy_until_the_weight_changes(ops):
    q, w = _gguf_blocks("Q4_1", 16, 64, seed=4)
    lin = SkinnyCPULinear(ops)
    calls = []

    class Spy:
        def __getattr__(self, name):
            def call(*a, **k):
                calls.append(name)
                return getattr(ops, name)(*a, **k)
            return call
    lin.ops = Spy()
    with pytest.raises(ValueError, match="shape"):
        lin.register_quantized(w[:8], q)
    lin.register_quantized(w, q)
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = lin(x, w)
        assert calls == ["quant_linear"]
        torch.testing.assert_close(first, F.linear(x, w), rtol=1e-5, atol=1e-4)
        assert lin(x, w.clone()).shape == (3, 16) and calls[-1] == "skinny_linear"   # another tensor
        w.mul_(2)   # written in place: the copy is stale
        torch.testing.assert_close(lin(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert calls == ["quant_linear", "skinny_linear", "skinny_linear"]


def test_q8_0_of_a_weight_made_here_and_rows_of_a_block_copy(ops):
    """quantize_q8_0 matches gguf-py's Q8_0; read_as_q8_0 gives a weight its blocks and their
    values (so every batch size computes one function); select_rows keeps the source's blocks."""
    import numpy as np
    gguf = pytest.importorskip("gguf")
    from spruce.models.quant import Q8_0, quantize_q8_0, read_as_q8_0, select_rows
    w = torch.randn(40, 96) * 0.1
    q = quantize_q8_0(w)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    assert q.format == Q8_0 and torch.equal(q.dequantize(), torch.from_numpy(np.ascontiguousarray(ref)))
    assert quantize_q8_0(torch.randn(4, 33)) is None and quantize_q8_0(torch.zeros(2, 32)).dequantize().eq(0).all()
    lin = SkinnyCPULinear(ops)
    params = [torch.nn.Parameter(w.clone(), requires_grad=False), torch.nn.Parameter(torch.randn(8, 33))]
    assert read_as_q8_0(lin, params) == 1 and lin.num_quantized == 1
    assert torch.equal(params[0], q.dequantize()) and lin.quantized(params[1]) is None
    assert read_as_q8_0(lin, params) == 0 and read_as_q8_0(TorchLinear(), params) == 0   # kept / no blocks
    x = torch.randn(3, 96)
    with torch.no_grad():
        full = lin(x, params[0])
        rows = torch.tensor([5, 0, 39, 7])
        sub = select_rows(lin, params[0], rows)
        assert lin.quantized(sub) is not None and torch.equal(lin(x, sub), full[:, rows])
        plain = select_rows(lin, w, rows)        # no block copy on w: the rows get Q8_0 of their own
        assert torch.equal(plain, q.dequantize()[rows]) and lin.quantized(plain) is not None


def test_bf16_model_reads_quantized_blocks_at_decode_sizes_only(ops):
    from spruce.models.linear import BF16_QUANT_DOT_MAX_ROWS, BF16_QUANT_MAX_ROWS
    q, w32 = _gguf_blocks("Q4_1", 16, 64, seed=5)
    w = w32.to(torch.bfloat16)
    lin = SkinnyCPULinear(ops)
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)
    lin.ops = Spy()
    amx = ops.amx_available()
    # With AMX the blocks are not kept: the AMX GEMM on the bf16 weight is faster at every size.
    assert lin.register_quantized(w, q) is not amx and lin.num_quantized == (0 if amx else 1)
    dot_rows = BF16_QUANT_DOT_MAX_ROWS if ops.quant_bf16_available() else 0
    b = torch.randn(16).to(torch.bfloat16)
    with torch.no_grad():
        for m in sorted({1, BF16_QUANT_MAX_ROWS, BF16_QUANT_MAX_ROWS + 1, dot_rows, dot_rows + 1} - {0}):
            calls.clear()
            x = torch.randn(m, 64).to(torch.bfloat16)
            got = lin(x, w, b)
            assert got.dtype == torch.bfloat16 and got.shape == (m, 16)
            bf16_ref = (x.float() @ w32.bfloat16().float().t() + b.float()).bfloat16()
            if amx:
                assert calls[-1] == "amx_linear"
                torch.testing.assert_close(got.float(), bf16_ref.float(), atol=0.1, rtol=1 / 128)
            elif m <= dot_rows:              # bf16 dot products on the blocks' bf16 values
                assert calls == ["quant_linear_bf16"]
                torch.testing.assert_close(got.float(), bf16_ref.float(), atol=0.05, rtol=1 / 128)
            elif m <= BF16_QUANT_MAX_ROWS:   # fp32 on the exact values, then one rounding
                assert calls == ["quant_linear"]
                exact = torch.empty(m, 16)
                ops.skinny_linear(exact, x.float(), w32, b.float())
                assert torch.equal(got, exact.to(torch.bfloat16))
            else:
                assert "quant_linear" not in calls
                want = F.linear(x.float(), w32, b.float()).to(torch.bfloat16)
                torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)


def test_bf16_mid_sizes_run_a_packed_weight_until_it_changes(ops):
    """Between the quantized-block sizes and BF16_PACKED_MAX_ROWS a bf16 weight is packed once --
    into AMX tiles where the CPU has them, else oneDNN's blocked layout -- and reused; writing the
    weight in place drops the stale copy."""
    from spruce.models.linear import BF16_PACKED_MAX_ROWS, BF16_QUANT_MAX_ROWS
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 64, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    lin = SkinnyCPULinear(ops)
    with torch.no_grad():
        for m in (BF16_QUANT_MAX_ROWS + 1, 64, BF16_PACKED_MAX_ROWS, BF16_PACKED_MAX_ROWS + 1):
            x = torch.randn(m, 64, generator=g).bfloat16()
            want = F.linear(x.float(), w.float(), b.float())
            torch.testing.assert_close(lin(x, w, b).float(), want, atol=0.1, rtol=0.02)
        layout = "amx" if ops.amx_available() else "onednn"
        if layout == "onednn" and (not torch.backends.mkldnn.is_available()
                                   or not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            assert lin._packed == {}   # no packing here: the outputs above came from F.linear
            return
        assert list(lin._packed) == [(layout, w.data_ptr())]
        packed = lin._packed[layout, w.data_ptr()][2]
        w.mul_(-1)
        x = torch.randn(16, 64, generator=g).bfloat16()
        torch.testing.assert_close(lin(x, w).float(), F.linear(x.float(), w.float()), atol=0.1, rtol=0.02)
        assert lin._packed[layout, w.data_ptr()][2] is not packed


def test_bf16_wide_weights_above_32_rows_go_to_onednn(ops):
    """The rule from the module doc: an lm_head-wide weight runs AMX only up to AMX_WIDE_MAX_ROWS."""
    from spruce.models.linear import AMX_WIDE_COLUMNS, AMX_WIDE_MAX_ROWS
    if not ops.amx_available():
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(AMX_WIDE_COLUMNS + 16, 32, generator=g).bfloat16()
    lin = SkinnyCPULinear(ops)
    with torch.no_grad():
        for m in (AMX_WIDE_MAX_ROWS, AMX_WIDE_MAX_ROWS + 1):
            x = torch.randn(m, 32, generator=g).bfloat16()
            want = F.linear(x.float(), w.float())
            torch.testing.assert_close(lin(x, w).float(), want, atol=0.1, rtol=0.02)
    layouts = {layout for layout, _ in lin._packed}
    assert "amx" in layouts and ("onednn" in layouts or "onednn" in lin._no_layout)


def _amx_reference(x, w, b):
    want = x.float() @ w.float().t()
    return (want if b is None else want + b.float()).bfloat16()


@pytest.mark.parametrize("m", [1, 5, 16, 17, 37, 64, 256])
@pytest.mark.parametrize("n,k", [(16, 32), (48, 576), (960, 576), (64, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_linear_matches_fp32_to_one_rounding(ops, m, n, k, threads):
    """fp32 accumulation of exact bf16 products, then one round to bf16: at most an ulp or so
    from the fp32 reference (the sum order differs)."""
    if not ops.amx_available():
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    packed = ops.amx_pack_weight(w)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            out = torch.full((m, n), float("nan")).bfloat16()
            ops.amx_linear(out, x, packed, n, bias)
            torch.testing.assert_close(out.float(), _amx_reference(x, w, bias).float(),
                                       atol=0.02 * k ** 0.5, rtol=1 / 128)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("n,k", [(16, 64), (48, 576), (962, 576), (33, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_quant_linear_bf16_is_one_rounding_of_the_bf16_weight_and_row_independent(ops, fmt, n, k, threads):
    """quant_linear_bf16 multiplies by the bf16 model's own weight (the blocks' values rounded
    once to bf16): within one output rounding of an fp32 reference, and every output row is the
    same bits whatever else is in the batch (1 to 16 rows, odd n, one thread or two)."""
    if not ops.quant_bf16_available():
        pytest.skip("this CPU has no AVX-512 BF16")
    q, w32 = _gguf_blocks(fmt, n, k, seed=n + k)
    w = w32.bfloat16()
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(16, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in (None, bias):
            want = x.float() @ w.float().t() + (0 if b is None else b)
            full = torch.empty(16, n, dtype=torch.bfloat16)
            ops.quant_linear_bf16(full, x, q.format, q.qs, q.scale, q.min, b)
            torch.testing.assert_close(full.float(), want, atol=1e-2, rtol=1 / 128)
            for m in (1, 3, 5, 13):
                part = torch.empty(m, n, dtype=torch.bfloat16)
                ops.quant_linear_bf16(part, x[:m], q.format, q.qs, q.scale, q.min, b)
                assert torch.equal(part, full[:m])
            one = torch.empty(1, n, dtype=torch.bfloat16)
            ops.quant_linear_bf16(one, x[7:8], q.format, q.qs, q.scale, q.min, b)
            assert torch.equal(one[0], full[7])
    finally:
        torch.set_num_threads(old)


def test_quant_linear_bf16_strided_rows_and_bad_input(ops):
    if not ops.quant_bf16_available():
        pytest.skip("this CPU has no AVX-512 BF16")
    q, w32 = _gguf_blocks("Q4_1", 24, 64, seed=1)
    x_buf = torch.randn(5, 96).bfloat16()
    x = x_buf[:, 16:80]
    out = torch.empty(5, 24, dtype=torch.bfloat16)
    ops.quant_linear_bf16(out, x, q.format, q.qs, q.scale, q.min, None)
    torch.testing.assert_close(out.float(), x.float() @ w32.bfloat16().float().t(), atol=1e-2, rtol=1 / 128)
    with pytest.raises(RuntimeError, match="x has 32 columns"):
        ops.quant_linear_bf16(out, torch.randn(5, 32).bfloat16(), q.format, q.qs, q.scale, q.min, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.quant_linear_bf16(out, x.float(), q.format, q.qs, q.scale, q.min, None)
    with pytest.raises(RuntimeError, match="Q4_1 needs min"):
        ops.quant_linear_bf16(out, x, q.format, q.qs, q.scale, None, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.quant_linear_bf16(out, x, q.format, q.qs, q.scale, q.min, torch.randn(24).bfloat16())


def test_amx_linear_strided_rows_and_bad_shapes(ops):
    if not ops.amx_available():
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(3)
    x_buf = torch.randn(19, 96, generator=g).bfloat16()
    w = torch.randn(32, 64, generator=g).bfloat16()
    x = x_buf[:, 16:80]          # row stride 96, unit inner stride
    out = torch.empty(19, 32).bfloat16()
    ops.amx_linear(out, x, ops.amx_pack_weight(w), 32, None)
    torch.testing.assert_close(out.float(), _amx_reference(x, w, None).float(), atol=0.2, rtol=1 / 128)
    with pytest.raises(RuntimeError, match="amx_pack_weight"):
        ops.amx_pack_weight(torch.randn(24, 64).bfloat16())     # 24 columns: not whole tiles
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.amx_linear(out, x, ops.amx_pack_weight(w), 48, None)
    with pytest.raises(RuntimeError, match="unit inner stride"):
        ops.amx_linear(out, torch.randn(64, 19).bfloat16().t(), ops.amx_pack_weight(w), 32, None)

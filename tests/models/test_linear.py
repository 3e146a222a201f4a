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
    assert type(get_linear("cpu", torch.bfloat16)) is TorchLinear
    monkeypatch.setenv("SPRUCE_LINEAR_BACKEND", "torch")
    assert type(get_linear("cpu", torch.float32)) is TorchLinear
    monkeypatch.setenv("SPRUCE_LINEAR_BACKEND", "native")
    with pytest.raises(ValueError, match="float32 model on CPU"):
        get_linear("cpu", torch.bfloat16)
    monkeypatch.setenv("SPRUCE_LINEAR_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPRUCE_LINEAR_BACKEND"):
        get_linear("cpu", torch.float32)

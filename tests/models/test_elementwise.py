"""The fused native elementwise ops (spruce/csrc/fused_ops.cpp) against the torch sequence they
replace. fp32 agrees to float rounding; bf16 to one bf16 rounding (the ops round where torch
rounds, but fp32 sums run in a different order)."""
import pytest
import torch

from spruce.models.elementwise import NativeElementwise, TorchElementwise, get_elementwise

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)


@pytest.fixture(params=[False, True], ids=["vector", "scalar"])
def native(ops, request):
    """Both the AVX-512 kernels (where built) and the portable loops."""
    ops.set_force_scalar_elementwise(request.param)
    yield NativeElementwise(ops)
    ops.set_force_scalar_elementwise(False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 576), (7, 64), (300, 576), (3, 10)])
def test_rms_norm_and_add(native, dtype, rows, d):
    g = torch.Generator().manual_seed(rows * d)
    x = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    res = torch.randn(rows, d, generator=g).to(dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    ref = TorchElementwise()
    torch.testing.assert_close(native.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), **_tol(dtype))
    want_out, want_res = ref.add_rms_norm(x, res.clone(), w, 1e-5)
    res_buf = res.clone()
    out, res_out = native.add_rms_norm(x, res_buf, w, 1e-5)
    assert res_out.data_ptr() == res_buf.data_ptr()   # updated in place
    assert torch.equal(res_out, want_res)              # one rounded add: bit-identical
    torch.testing.assert_close(out, want_out, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 1536), (5, 17), (130, 1536)])
def test_silu_and_mul(native, dtype, rows, d):
    g = torch.Generator().manual_seed(rows + d)
    gu = (torch.randn(rows, 2 * d, generator=g) * 6).to(dtype)
    gu[0, :3] = torch.tensor([-100.0, 100.0, 0.0])   # exp's clamp and the zero crossing
    torch.testing.assert_close(native.silu_and_mul(gu), TorchElementwise().silu_and_mul(gu), **_tol(dtype))


def test_silu_and_mul_nan_propagates(native):
    gu = torch.zeros(1, 8)
    gu[0, 1] = float("nan")
    out = native.silu_and_mul(gu)
    assert out[0, 1].isnan() and not out[0, 0].isnan()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_a_strided_view(native, dtype):
    """As the model calls it: q and k heads are a column slice of the fused qkv output."""
    t, nh, d, max_len = 9, 12, 64, 40
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, (nh + 4) * d, generator=g).to(dtype)
    qk = qkv[:, :nh * d].view(t, nh, d)
    ang = torch.rand(max_len, d // 2, generator=g) * 6
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
    sin = torch.cat((-ang.sin(), ang.sin()), -1).to(dtype)
    pos = torch.tensor([0, 5, 39, 2, 2, 7, 1, 30, 11])
    want = TorchElementwise().rope(qk.clone(), pos, cos, sin)
    tail = qkv[:, nh * d:].clone()
    got = native.rope(qk, pos, cos, sin)
    assert got.data_ptr() == qk.data_ptr()
    torch.testing.assert_close(got, want, **_tol(dtype))
    assert torch.equal(qkv[:, nh * d:], tail)          # the v columns are untouched


def test_rope_rejects_positions_outside_the_table(ops):
    qk, cos = torch.zeros(2, 1, 8), torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="outside the table"):
        ops.rope_inplace(qk, torch.tensor([0, 4]), cos, cos)


def test_autograd_takes_the_torch_path(native):
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16)
    native.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None


def test_dispatch(ops, monkeypatch):
    assert isinstance(get_elementwise("cpu", torch.bfloat16), NativeElementwise)
    assert type(get_elementwise("cpu", torch.float16)) is TorchElementwise
    monkeypatch.setenv("SPRUCE_ELEMENTWISE_BACKEND", "torch")
    assert type(get_elementwise("cpu", torch.float32)) is TorchElementwise
    monkeypatch.setenv("SPRUCE_ELEMENTWISE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SPRUCE_ELEMENTWISE_BACKEND"):
        get_elementwise("cpu", torch.float32)

import torch

from spruce.models.kv_memory import prefault, zeros


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_zeros_are_zero_and_lazy():
    before = _rss_bytes()
    t = zeros((4096, 16, 2, 64), torch.bfloat16, "cpu")   # 16 MiB
    assert t.shape == (4096, 16, 2, 64) and t.dtype == torch.bfloat16
    assert _rss_bytes() - before < 8 << 20   # not resident until written
    assert t[::97].float().abs().sum().item() == 0.0


def test_prefault_makes_pages_resident_and_keeps_their_content():
    tensors = [zeros((2048, 16, 2, 64), torch.bfloat16, "cpu") for _ in range(4)]   # 4 x 8 MiB
    tensors[1][5] = 3.0   # written before: content must survive the populate
    before = _rss_bytes()
    assert prefault(tensors, num_threads=2)
    grown = _rss_bytes() - before
    assert grown >= 28 << 20, f"only {grown} bytes became resident"
    assert torch.all(tensors[1][5] == 3.0)
    assert tensors[1][4].float().abs().sum().item() == 0.0
    assert tensors[3][-1].float().abs().sum().item() == 0.0


def test_engine_with_kv_prefault_generates_the_same_text(make_llm):
    from spruce import SamplingParams
    params = SamplingParams(max_tokens=12, temperature=0)
    lazy = make_llm().generate(["The capital of France is"], params)[0].outputs[0].token_ids
    resident = make_llm(kv_prefault=True).generate(["The capital of France is"], params)[0].outputs[0].token_ids
    assert lazy == resident

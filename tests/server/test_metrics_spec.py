"""The spec-decode counters reach /metrics under vLLM's names (collector unit test, no server)."""
from types import SimpleNamespace

from spruce.engine.async_engine import EngineStats
from spruce.server.metrics import _EngineCollector


def test_spec_decode_counters_exported():
    stats = EngineStats(spec_num_drafts=5, spec_num_draft_tokens=20, spec_num_accepted_tokens=7,
                        spec_num_accepted_tokens_per_pos=(4, 2, 1, 0))
    engine = SimpleNamespace(stats=stats, num_waiting=0)
    families = {f.name: f for f in _EngineCollector(engine, "m").collect()}
    assert families["vllm:spec_decode_num_drafts"].samples[0].value == 5
    assert families["vllm:spec_decode_num_draft_tokens"].samples[0].value == 20
    assert families["vllm:spec_decode_num_accepted_tokens"].samples[0].value == 7
    per_pos = {s.labels["position"]: s.value for s in families["vllm:spec_decode_num_accepted_tokens_per_pos"].samples}
    assert per_pos == {"0": 4, "1": 2, "2": 1, "3": 0}

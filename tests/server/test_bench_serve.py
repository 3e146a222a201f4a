"""`spruce bench serve` pieces that need no server: vLLM's random dataset, metrics, /metrics parsing."""
import asyncio
import json

import pytest

from spruce.bench.serve import (RequestResult, _sse_data, calculate_metrics, metric_value, parse_goodput,
                                parse_prometheus)
from spruce.bench.serve_datasets import BenchTokenizer, sample_random
from spruce.server.serving import _sse


@pytest.fixture(scope="module")
def tok():
    return BenchTokenizer("smollm2-135m")


def test_random_dataset_is_vllms(tok):
    reqs = sample_random(tok, 8, input_len=64, output_len=8, seed=0)
    assert [r.prompt_len for r in reqs] == [64] * 8 and [r.expected_output_len for r in reqs] == [8] * 8
    # `vllm bench serve --dataset-name random --random-input-len 64 --seed 0` (vLLM 0.32) starts so.
    assert reqs[0].prompt.startswith(" Infrared Treating cartsLeanslotsawning pooled feministsbrother")
    ranged = sample_random(tok, 32, input_len=100, output_len=50, range_ratio=0.5, seed=1)
    assert all(50 <= r.prompt_len <= 150 and 25 <= r.expected_output_len <= 75 for r in ranged)
    assert len({r.prompt_len for r in ranged}) > 5


def test_prometheus_parsing():
    text = ('# HELP x\nvllm:request_success_total{finished_reason="stop",model_name="m"} 3.0\n'
            'vllm:request_success_total{finished_reason="length",model_name="m"} 2.0\nvllm:plain 1.5\n')
    samples = parse_prometheus(text)
    assert metric_value(samples, "vllm:request_success_total") == 5
    assert metric_value(samples, "vllm:request_success_total", finished_reason="stop") == 3
    assert metric_value(samples, "vllm:plain") == 1.5 and metric_value(samples, "absent") == 0


def test_metrics_follow_vllm_definitions(tok):
    outs = [RequestResult(True, 10, 3, ttft=0.1, itl=[0.2, 0.4], latency=0.7, start_time=0.0),
            RequestResult(True, 20, 1, ttft=0.5, itl=[], latency=0.5, start_time=0.1),
            RequestResult(False, 5, error="boom")]
    m, lens = calculate_metrics(outs, 2.0, tok, [99.0], parse_goodput(["ttft:200", "tpot:400"]))
    assert lens == [3, 1, 0] and m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 30 and m["output_throughput"] == 2.0
    assert m["mean_tpot_ms"] == pytest.approx(300)  # (0.7 - 0.1) / 2, only requests with > 1 token
    assert m["mean_itl_ms"] == pytest.approx(300) and m["mean_ttft_ms"] == pytest.approx(300)
    assert m["request_goodput"] == 0.5  # the second misses ttft:200
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])


def test_sse_events_split_at_newlines_only():
    """A chunk whose text holds U+2028 / U+0085 (raw in JSON) stays one event, however the
    bytes arrive; the server escapes them too, for readers that split like str.splitlines."""
    text = "a\u2028b\x85c\u2029d \u00e9"
    raw = f'data: {json.dumps({"t": text}, ensure_ascii=False)}\r\n\ndata: [DONE]\n\n'.encode()

    class Resp:
        def __init__(self, step):
            self.step = step

        async def aiter_bytes(self):
            for i in range(0, len(raw), self.step):
                yield raw[i:i + self.step]

    async def collect(step):
        return [d async for d in _sse_data(Resp(step))]

    for step in (1, 3, len(raw)):
        events = asyncio.run(collect(step))
        assert events[-1] == "[DONE]" and json.loads(events[0]) == {"t": text}
    served = _sse({"t": text})
    assert len(served.rstrip("\n").splitlines()) == 1 and json.loads(served[5:]) == {"t": text}

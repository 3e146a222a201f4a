"""`spruce bench serve` pieces that need no server: vLLM's random dataset, metrics, /metrics parsing."""
import pytest

from spruce.bench.serve import RequestResult, calculate_metrics, metric_value, parse_goodput, parse_prometheus
from spruce.bench.serve_datasets import BenchTokenizer, sample_random


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

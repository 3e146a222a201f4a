"""Prometheus metrics under vLLM's names (routers, autoscalers and Grafana dashboards key on them).

Engine-wide numbers (queue lengths, KV usage, token counters) are read from the latest
EngineStats at scrape time; per-request histograms are fed by every delta the engine sends,
whether or not the request's client is still connected.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from spruce.engine.async_engine import AsyncEngine, RequestDelta

# vLLM's default buckets (vllm/v1/metrics/buckets.py), so dashboards built for it read ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


def _token_buckets(max_model_len: int) -> list[int]:
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > max_model_len:
                return out
            out.append(v)
        exp += 1


class _EngineCollector:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s, labels = self.engine.stats, [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c
        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    max(self.engine.num_waiting, 0))
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in queried tokens.",
                      s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.", s.prefix_cache_hits)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.", s.num_preemptions)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens)
        yield counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", s.spec_num_drafts)
        yield counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", s.spec_num_draft_tokens)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                      s.spec_num_accepted_tokens)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.", labels=["model_name", "position"])
        for pos, n in enumerate(s.spec_num_accepted_tokens_per_pos):
            per_pos.add_metric([self.model_name, str(pos)], n)
        yield per_pos


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str, max_model_len: int):
        disable_created_metrics()  # *_created series double the scrape for nothing a dashboard reads
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        lab = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=self.registry).labels(model_name)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds",
                          "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS)
        tokens = _token_buckets(max_model_len)
        self.prompt_len = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.gen_len = hist("vllm:request_generation_tokens", "Number of generation tokens processed.", tokens)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               lab + ["finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        self._last_token: dict[str, float] = {}
        self._num_tokens: dict[str, int] = {}
        engine.hooks.append(self.observe)

    def observe(self, d: RequestDelta, step_time: float) -> None:
        rid = d.request_id
        new = sum(len(c.token_ids) for c in d.completions)
        if new:
            last = self._last_token.get(rid)
            if last is None:
                if d.metrics is not None:
                    self.ttft.observe(max(step_time - d.metrics.arrival_time, 0.0))
            else:
                self.itl.observe(step_time - last)
            self._last_token[rid] = step_time
            self._num_tokens[rid] = self._num_tokens.get(rid, 0) + new
        if not d.finished:
            return
        self._last_token.pop(rid, None)
        generated = self._num_tokens.pop(rid, 0)
        m = d.metrics
        if m is not None:
            self.e2e.observe(max(step_time - m.arrival_time, 0.0))
            if m.queue_time is not None:
                self.queue.observe(max(m.queue_time, 0.0))
        self.prompt_len.observe(d.num_prompt_tokens)
        self.gen_len.observe(generated)
        for c in d.completions:
            self.success.labels(self.model_name, c.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

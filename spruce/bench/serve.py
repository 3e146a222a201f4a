"""`spruce bench serve`: online serving benchmark, flag- and result-compatible with `vllm bench serve`.

Timing follows vLLM (docs: shared/research/PEERS.md D1): st just before the POST; TTFT = first
chunk carrying a choice; ITL = gaps between such chunks (per chunk, pooled over requests); E2EL =
last such chunk; TPOT = (E2EL - TTFT) / (output tokens - 1), output tokens from the server's usage.
It also reads the server's /metrics before and after and prints the deltas (preemptions, prefix
hit rate, server-side TTFT/queue time), against Spruce or vLLM alike.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

import numpy as np

from spruce.bench.serve_datasets import BenchTokenizer, SampleRequest, sample_custom, sample_random

_SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE_RE.match(line)
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(_LABEL_RE.findall(m.group(2) or "")), float(m.group(3))))
    return out


def metric_value(samples, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""


async def _sse_data(resp):
    """The `data:` fields of an SSE stream, split at LF (or CRLF) as the SSE spec does. Not
    httpx's aiter_lines: it splits like str.splitlines, also at U+0085, U+2028 and U+2029, which
    JSON carries raw inside strings, so a token that decodes to one of them cut a chunk in two
    (one failed request of 64 in a W3 run at 4 req/s, 2026-12-04)."""
    buf = b""
    async for part in resp.aiter_bytes():
        buf += part
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip().decode()
    if buf.startswith(b"data:"):
        yield buf[5:].strip().decode()


async def _send(client, api_url: str, chat: bool, model: str, req: SampleRequest, args) -> RequestResult:
    payload: dict = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        payload.update(messages=[{"role": "user", "content": [{"type": "text", "text": req.prompt}]}],
                       max_completion_tokens=req.expected_output_len)
    else:
        payload.update(prompt=req.prompt, repetition_penalty=1.0, max_tokens=req.expected_output_len,
                       logprobs=args.logprobs)
    if args.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(args.extra_body)
    headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"} if os.environ.get("OPENAI_API_KEY") else {}
    out = RequestResult(prompt_len=req.prompt_len)
    st = last = time.perf_counter()
    out.start_time, text, first = st, [], True
    try:
        async with client.stream("POST", api_url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}"
                return out
            async for data in _sse_data(resp):
                if data == "[DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    out.error = str(chunk["error"])
                    return out
                if choices := chunk.get("choices"):
                    c = choices[0]
                    piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    text.append(piece or "")
                    if first:
                        out.ttft, first = now - st, False
                    else:
                        out.itl.append(now - last)
                    last = now
                elif usage := chunk.get("usage"):
                    out.output_tokens = usage.get("completion_tokens") or 0
                    if usage.get("prompt_tokens") is not None:
                        out.prompt_len = usage["prompt_tokens"]
        out.generated_text, out.latency = "".join(text), last - st
        out.success = not first
        if first:
            out.error = "Never received a valid chunk to calculate TTFT."
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        out.error = f"{type(e).__name__}: {e}"
    return out


def _arrival_delays(n: int, rate: float, burstiness: float) -> list[float]:
    """Cumulative send times: gamma gaps (shape=burstiness, mean 1/rate), rescaled so the n
    requests span n/rate seconds exactly, as vLLM does."""
    if rate == float("inf"):
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    delays = np.cumsum([np.random.gamma(shape=burstiness, scale=theta) for _ in range(n)]).tolist()
    return [d * (n / rate) / delays[-1] for d in delays] if delays[-1] else delays


async def _fetch_metrics(client, base_url: str):
    try:
        r = await client.get(base_url + "/metrics", timeout=10)
        return parse_prometheus(r.text) if r.status_code == 200 else None
    except Exception:  # noqa: BLE001 - a server without /metrics is still benchmarkable
        return None


def _server_deltas(before, after) -> dict:
    if before is None or after is None:
        return {}

    def d(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    def mean_ms(hist):
        n = d(f"vllm:{hist}_count")
        return d(f"vllm:{hist}_sum") / n * 1000 if n else None
    queries = d("vllm:prefix_cache_queries_total")
    return {"prompt_tokens": d("vllm:prompt_tokens_total"), "generation_tokens": d("vllm:generation_tokens_total"),
            "preemptions": d("vllm:num_preemptions_total"),
            "prefix_cache_hit_rate": d("vllm:prefix_cache_hits_total") / queries if queries else None,
            "requests_stop": d("vllm:request_success_total", finished_reason="stop"),
            "requests_length": d("vllm:request_success_total", finished_reason="length"),
            "requests_abort": d("vllm:request_success_total", finished_reason="abort"),
            "mean_ttft_ms": mean_ms("time_to_first_token_seconds"),
            "mean_queue_time_ms": mean_ms("request_queue_time_seconds"),
            "mean_itl_ms": mean_ms("inter_token_latency_seconds"),
            "mean_e2el_ms": mean_ms("e2e_request_latency_seconds")}


def calculate_metrics(outputs: list[RequestResult], duration: float, tok: BenchTokenizer,
                      percentiles: list[float], goodput: dict) -> tuple[dict, list[int]]:
    ok = [o for o in outputs if o.success]
    lens = [(o.output_tokens or len(tok.encode(o.generated_text, add_special_tokens=False))) if o.success else 0
            for o in outputs]
    ok_lens = [n for n, o in zip(lens, outputs) if o.success]
    ttfts = [o.ttft for o in ok]
    e2els = [o.latency for o in ok]
    itls = [x for o in ok for x in o.itl]
    all_tpots = [(o.latency - o.ttft) / (n - 1) if n > 1 else 0.0 for o, n in zip(ok, ok_lens)]
    tpots = [t for t, n in zip(all_tpots, ok_lens) if n > 1]
    good = 0
    if goodput:
        per_req = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        for i in range(len(ok)):
            good += all(per_req[k][i] <= v / 1000 for k, v in goodput.items())
    total_in, total_out = sum(o.prompt_len for o in ok), sum(lens)
    m = {"completed": len(ok), "failed": len(outputs) - len(ok), "total_input_tokens": total_in,
         "total_output_tokens": total_out, "request_throughput": len(ok) / duration,
         "request_goodput": good / duration if goodput else None, "output_throughput": total_out / duration,
         "total_token_throughput": (total_in + total_out) / duration}
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        v = np.array(vals or [0.0]) * 1000
        m[f"mean_{name}_ms"], m[f"median_{name}_ms"], m[f"std_{name}_ms"] = v.mean(), np.median(v), v.std()
        for p in percentiles:
            m[f"p{int(p) if int(p) == p else p}_{name}_ms"] = float(np.percentile(v, p))
    # Peak output tok/s and peak concurrency over 1-second buckets, as vLLM reports them.
    m["max_output_tokens_per_s"], m["max_concurrent_requests"] = 0.0, 0
    if ok:
        t0 = min(o.start_time for o in ok)
        nb = int(np.ceil(max(o.start_time + o.latency for o in ok) - t0)) + 1
        toks, conc = np.zeros(nb), np.zeros(nb)
        for o in ok:
            t = o.start_time + o.ttft
            for gap in [0.0, *o.itl]:
                t += gap
                toks[min(int(t - t0), nb - 1)] += 1
            conc[int(o.start_time - t0):int(o.start_time + o.latency - t0) + 1] += 1
        m["max_output_tokens_per_s"], m["max_concurrent_requests"] = float(toks.max()), int(conc.max())
    return m, lens


def _print_block(m: dict, args, percentile_metrics: list[str], percentiles: list[float], goodput: dict) -> None:
    line = "{:<40} {:<10}".format
    fline = "{:<40} {:<10.2f}".format
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    print(line("Successful requests:", m["completed"]))
    print(line("Failed requests:", m["failed"]))
    if args.max_concurrency is not None:
        print(line("Maximum request concurrency:", args.max_concurrency))
    if args.request_rate != float("inf"):
        print(fline("Request rate configured (RPS):", args.request_rate))
    print(fline("Benchmark duration (s):", m["duration"]))
    print(line("Total input tokens:", m["total_input_tokens"]))
    print(line("Total generated tokens:", m["total_output_tokens"]))
    print(fline("Request throughput (req/s):", m["request_throughput"]))
    if goodput:
        print(fline("Request goodput (req/s):", m["request_goodput"]))
    print(fline("Output token throughput (tok/s):", m["output_throughput"]))
    print(fline("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"]))
    print(fline("Peak concurrent requests:", m["max_concurrent_requests"]))
    print(fline("Total token throughput (tok/s):", m["total_token_throughput"]))
    heads = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
             "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
    for key in ("ttft", "tpot", "itl", "e2el"):
        if key not in percentile_metrics:
            continue
        short, header = heads[key]
        print("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        print(fline(f"Mean {short} (ms):", m[f"mean_{key}_ms"]))
        print(fline(f"Median {short} (ms):", m[f"median_{key}_ms"]))
        for p in percentiles:
            word = str(int(p)) if int(p) == p else str(p)
            print(fline(f"P{word} {short} (ms):", m[f"p{word}_{key}_ms"]))
    server = m.get("server_metrics")
    if server:
        print("{s:{c}^{n}}".format(s="Server /metrics (deltas)", n=50, c="-"))
        for k, v in server.items():
            print(line(f"{k}:", "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)))
    print("=" * 50)


async def benchmark(args, requests: list[SampleRequest], tok: BenchTokenizer, model: str,
                    base_url: str, api_url: str) -> dict:
    import httpx
    chat = args.backend == "openai-chat"
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(6 * 3600), limits=limits) as client:
        for _ in range(args.num_warmups):
            await _send(client, api_url, chat, model, requests[0], args)
        before = await _fetch_metrics(client, base_url)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(req):
            if sem is None:
                return await _send(client, api_url, chat, model, req, args)
            async with sem:
                return await _send(client, api_url, chat, model, req, args)
        delays = _arrival_delays(len(requests), args.request_rate, args.burstiness)
        print(f"Traffic request rate: {args.request_rate}, burstiness: {args.burstiness}, "
              f"max concurrency: {args.max_concurrency}")
        start, tasks = time.perf_counter(), []
        for req, delay in zip(requests, delays):
            wait = start + delay - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(req)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        after = await _fetch_metrics(client, base_url)
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    goodput = parse_goodput(args.goodput)
    m, lens = calculate_metrics(outputs, duration, tok, percentiles, goodput)
    m["duration"] = duration
    m["server_metrics"] = _server_deltas(before, after)
    failed = [o.error for o in outputs if not o.success]
    if failed:
        print(f"Failed requests ({len(failed)}; first 5):", *failed[:5], sep="\n  ")
    _print_block(m, args, args.percentile_metrics.split(","), percentiles, goodput)
    m.update(input_lens=[o.prompt_len for o in outputs], output_lens=lens, ttfts=[o.ttft for o in outputs],
             itls=[o.itl for o in outputs], start_times=[o.start_time for o in outputs],
             generated_texts=[o.generated_text for o in outputs], errors=[o.error for o in outputs])
    return m


def parse_goodput(pairs: Optional[list[str]]) -> dict:
    out = {}
    for pair in pairs or []:
        try:
            name, val = pair.split(":")
            out[name] = float(val)
        except ValueError:
            raise ValueError(f"--goodput takes KEY:MS pairs (ttft, tpot, e2el), got {pair!r}")
        if name not in ("ttft", "tpot", "e2el") or out[name] < 0:
            raise ValueError(f"--goodput: {pair!r}: the key must be ttft|tpot|e2el, the value >= 0 ms")
    return out


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="openai", choices=["openai", "openai-chat"])
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="default /v1/completions, /v1/chat/completions for openai-chat")
    p.add_argument("--model", default=None, help="model name sent to the server (default: its first model)")
    p.add_argument("--served-model-name", default=None, help="name to send when it differs from --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer for the dataset (default: the model)")
    p.add_argument("--dataset-name", default="random", choices=["random", "custom"])
    p.add_argument("--dataset-path", default=None, help="custom: JSONL with a 'prompt' per line")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--custom-output-len", type=int, default=256)
    p.add_argument("--skip-chat-template", action="store_true")
    p.add_argument("--disable-shuffle", action="store_true")
    p.add_argument("--no-oversample", action="store_true")
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--goodput", nargs="+", default=None, help="SLOs as KEY:MS, e.g. ttft:2000 tpot:100")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    for name in ("temperature", "top-p", "top-k", "min-p", "frequency-penalty", "presence-penalty",
                 "repetition-penalty"):
        p.add_argument(f"--{name}", type=int if name == "top-k" else float, default=None)
    p.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request")
    p.add_argument("--label", default=None)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.set_defaults(func=run_serve_bench)


async def _first_model(base_url: str) -> str:
    import httpx
    key = os.environ.get("OPENAI_API_KEY")
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.get(base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        r.raise_for_status()
        return r.json()["data"][0]["id"]


def run_serve_bench(args) -> int:
    random.seed(args.seed)
    np.random.seed(args.seed)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    endpoint = args.endpoint or ("/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions")
    model_id = args.model or asyncio.run(_first_model(base_url))
    model = args.served_model_name or model_id
    tok = BenchTokenizer(args.tokenizer or model_id)
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                                              "presence_penalty", "repetition_penalty") if getattr(args, k) is not None}
    args.extra_body = {**sampling, **(args.extra_body or {})}
    if args.dataset_name == "random":
        requests = sample_random(tok, args.num_prompts, args.random_input_len, args.random_output_len,
                                 args.random_range_ratio, args.random_prefix_len, args.seed)
    else:
        if not args.dataset_path:
            raise ValueError("--dataset-name custom needs --dataset-path FILE.jsonl")
        requests = sample_custom(tok, args.dataset_path, args.num_prompts, args.custom_output_len,
                                 args.skip_chat_template, args.seed, not args.disable_shuffle, args.no_oversample)
    ins = [r.prompt_len for r in requests]
    outs = [r.expected_output_len for r in requests]
    print(f"[bench serve] {base_url}{endpoint} model={model} tokenizer={args.tokenizer or model_id} "
          f"dataset={args.dataset_name} prompts={len(requests)} input_len min/mean/max={min(ins)}/{np.mean(ins):.0f}/"
          f"{max(ins)} output_len min/mean/max={min(outs)}/{np.mean(outs):.0f}/{max(outs)} seed={args.seed} "
          f"ignore_eos={args.ignore_eos} sampling={args.extra_body or 'server defaults'}")
    result = asyncio.run(benchmark(args, requests, tok, model, base_url, base_url + endpoint))
    dt = datetime.now().strftime("%Y%m%d-%H%M%S")
    result.update(date=dt, endpoint_type=args.backend, backend=args.backend, label=args.label, model_id=model_id,
                  tokenizer_id=args.tokenizer or model_id, num_prompts=args.num_prompts,
                  request_rate=args.request_rate if args.request_rate < float("inf") else "inf",
                  burstiness=args.burstiness, max_concurrency=args.max_concurrency)
    if not args.save_detailed:
        for key in ("input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors"):
            result.pop(key, None)
    if args.save_result:
        conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
        name = args.result_filename or \
            f"{args.label or args.backend}-{args.request_rate}qps{conc}-{model_id.rstrip('/').split('/')[-1]}-{dt}.json"
        if args.result_dir:
            os.makedirs(args.result_dir, exist_ok=True)
            name = os.path.join(args.result_dir, name)
        with open(name, "w", encoding="utf-8") as f:
            json.dump(result, f)
        print(f"[bench serve] results written to {name}")
    return 0 if result["completed"] else 1

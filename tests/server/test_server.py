"""The OpenAI API of `spruce serve`, through the official `openai` client, against a live server."""
import asyncio
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from spruce import SamplingParams
from spruce.bench.serve import metric_value, parse_prometheus

from .conftest import API_KEY, ServerProcess

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def metrics(url: str) -> list:
    return parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)


def wait_idle(url: str, timeout: float = 60) -> list:
    """Until nothing runs or waits and every KV block is back (the blocks a request held are freed)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (metric_value(m, "vllm:num_requests_running") == 0 and metric_value(m, "vllm:num_requests_waiting") == 0
                and metric_value(m, "vllm:kv_cache_usage_perc") == 0):
            return m
        assert time.monotonic() < deadline, "server did not go idle"
        time.sleep(0.2)


def test_models_health_version_tokenize(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL, "spruce-test"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert "version" in httpx.get(server.url + "/version").json()
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] > 0
    assert httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
    chat_tok = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert r.usage.prompt_tokens == chat_tok["count"]


def test_completion_and_chat(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    c = client.chat.completions.create(model="spruce-test", messages=CHAT, max_completion_tokens=5, temperature=0)
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content
    assert c.usage.completion_tokens <= 5


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_stream_reassembles_to_greedy_text(client, kind):
    kw = dict(model=MODEL, temperature=0, max_tokens=12)
    if kind == "chat":
        full = client.chat.completions.create(messages=CHAT, **kw)
        chunks = list(client.chat.completions.create(messages=CHAT, stream=True,
                                                     stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected, finish = full.choices[0].message.content, full.choices[0].finish_reason
    else:
        full = client.completions.create(prompt="Once upon a time", **kw)
        chunks = list(client.completions.create(prompt="Once upon a time", stream=True,
                                                stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected, finish = full.choices[0].text, full.choices[0].finish_reason
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n2_and_prompt_forms(server, client):
    r = client.completions.create(model=MODEL, prompt="Tell me a story", n=2, max_tokens=8, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens <= 16
    ids = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1).usage.prompt_tokens
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    assert len(tokens) == ids
    greedy = dict(model=MODEL, max_tokens=4, temperature=0)
    by_text = client.completions.create(prompt=["Hello", "Water boils at"], **greedy)
    by_ids = client.completions.create(prompt=[tokens, tokens], n=2, **greedy)
    assert len(by_text.choices) == 2 and len(by_ids.choices) == 4
    assert by_ids.choices[0].text == by_ids.choices[3].text == by_text.choices[0].text
    assert by_text.usage.prompt_tokens == ids + len(httpx.post(server.url + "/tokenize", json={
        "prompt": "Water boils at"}).json()["tokens"])
    echoed = client.completions.create(prompt="Hello", echo=True, **greedy).choices[0].text
    assert echoed == "Hello" + by_text.choices[0].text


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and val <= 0 and top[tok] == val  # greedy: the sampled token is the best
    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)


def test_stop(client):
    kw = dict(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    assert "6" in text
    r = client.completions.create(stop=["6"], **kw)
    assert r.choices[0].text == text[:text.index("6")] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == "6"


def test_32_concurrent_greedy_match_offline(server, make_llm):
    prompts = [f"Fact number {i} about the ocean:" for i in range(32)]
    llm = make_llm()
    offline = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6),
                                                       use_tqdm=False)]

    async def run():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        rs = await asyncio.gather(*[ac.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
                                    for p in prompts])
        await ac.close()
        return [r.choices[0].text for r in rs]
    assert asyncio.run(run()) == offline


def test_disconnect_mid_stream_frees_blocks(server):
    before = wait_idle(server.url)
    body = {"model": MODEL, "prompt": "Write a long story.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
        assert got
        m = metrics(server.url)
        assert metric_value(m, "vllm:num_requests_running") == 1 and metric_value(m, "vllm:kv_cache_usage_perc") > 0
    wait_idle(server.url)
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(60, read=2),
                   headers={"Authorization": f"Bearer {API_KEY}"})
    after = wait_idle(server.url)
    aborted = metric_value(after, "vllm:request_success_total", finished_reason="abort")
    assert aborted == metric_value(before, "vllm:request_success_total", finished_reason="abort") + 2


def test_metrics_move(server, client):
    before = wait_idle(server.url)
    r = client.completions.create(model=MODEL, prompt="Metrics please", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = metrics(server.url)

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)
    assert delta("vllm:generation_tokens_total") == 5
    assert delta("vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("vllm:prefix_cache_queries_total") >= r.usage.prompt_tokens
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"vllm:{h}_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 4
    assert metric_value(after, "vllm:num_preemptions_total") >= 0
    assert all(s[1].get("model_name") == MODEL for s in after if s[0].startswith("vllm:"))


ERROR_CASES = [
    ("completions", {"prompt": "hi", "bogus_field": 1}, 400, "bogus_field"),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"prompt": "hi", "max_tokens": 9000}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 999999]}, 400, "prompt"),
    ("completions", {"prompt": "hi", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("completions", {"prompt": "hi", "stop_token_ids": [999999]}, 400, "stop_token_ids"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "", "max_tokens": 2}, 400, "prompt"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 9000}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": CHAT, "tools": []}, 400, "tools"),
]


@pytest.mark.parametrize("route,body,status,param", ERROR_CASES, ids=[f"{c[0]}-{c[3]}-{c[2]}" for c in ERROR_CASES])
def test_errors(server, route, body, status, param):
    body = {"model": MODEL, **body}
    r = httpx.post(f"{server.url}/v1/{route}", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_auth_and_openai_error_types(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        good.completions.create(model=MODEL, prompt="hi", max_tokens=100000)
    assert httpx.get(server.url + "/health").status_code == 200  # the engine shrugged all of it off


def _stream_in_thread(url: str, body: dict, out: dict, key: str):
    def run():
        try:
            with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "stream": True, **body},
                              timeout=120) as r:
                out[key + "_status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        out.setdefault(key, []).append(json.loads(line[6:]))
        except Exception as e:  # noqa: BLE001 - reported by the asserts
            out[key + "_error"] = repr(e)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_overload_503_then_sigterm_drains():
    """One sequence at a time, one allowed to wait (thread engine loop, to cover that mode too)."""
    srv = ServerProcess("--max-num-seqs", "1", "--max-waiting-requests", "1", "--engine-loop", "thread",
                        "--shutdown-timeout", "60")
    try:
        out: dict = {}
        body = {"prompt": "Count to one hundred:", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
        a = _stream_in_thread(srv.url, body, out, "a")
        deadline = time.monotonic() + 60
        while not out.get("a"):
            assert time.monotonic() < deadline and a.is_alive(), out
            time.sleep(0.05)
        b = _stream_in_thread(srv.url, body, out, "b")
        while metric_value(metrics(srv.url), "vllm:num_requests_waiting") < 1:
            assert time.monotonic() < deadline, out
            time.sleep(0.05)
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded"
        srv.proc.send_signal(signal.SIGTERM)  # A runs and B waits: both must still complete
        time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):  # no new connections while draining
            httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=5)
        a.join(120)
        b.join(120)
        assert srv.proc.wait(60) == 0, srv.output()
        for key in ("a", "b"):
            assert out[key + "_status"] == 200 and key + "_error" not in out, out
            assert out[key][-1]["choices"][0]["finish_reason"] == "length"
            assert sum(1 for c in out[key] if c["choices"]) == 24
    finally:
        srv.stop()


def test_engine_death_fails_health_and_exits_nonzero():
    srv = ServerProcess()
    try:
        os.kill(srv.engine_pid(), signal.SIGKILL)
        saw_unhealthy = False
        deadline = time.monotonic() + 30
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                saw_unhealthy |= httpx.get(srv.url + "/health", timeout=2).status_code == 503
            except httpx.HTTPError:
                saw_unhealthy = True  # already closed its socket on the way out
            time.sleep(0.05)
        assert saw_unhealthy
        assert srv.proc.wait(30) == 1, srv.output()
    finally:
        srv.stop()


def test_bench_serve_against_server(server, tmp_path, monkeypatch, capsys):
    from spruce.cli import main
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    code = main(["bench", "serve", "--base-url", server.url, "--dataset-name", "random", "--random-input-len", "16",
                 "--random-output-len", "4", "--num-prompts", "4", "--ignore-eos", "--max-concurrency", "2",
                 "--goodput", "ttft:60000", "tpot:60000", "--save-result", "--result-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "Serving Benchmark Result" in out and "Mean TTFT (ms):" in out and "P99 E2EL (ms):" in out
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] == 16 and result["total_input_tokens"] == 64
    assert result["request_goodput"] == result["request_throughput"] and result["max_concurrency"] == 2
    assert result["server_metrics"]["generation_tokens"] == 16 and result["server_metrics"]["requests_length"] == 4

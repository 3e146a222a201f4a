"""/v1/completions and /v1/chat/completions: request -> validated engine requests -> OpenAI responses.

Every check that can refuse a request runs here, before anything reaches the engine, so a bad
request is a 400 and never an engine failure (token ids, context length, KV capacity).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse

from spruce.engine.async_engine import AsyncEngine, CompletionDelta, EngineDeadError, RequestRejected
from spruce.sampling_params import SamplingParams
from spruce.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from spruce.tokenizer import Tokenizer


class SSEResponse(StreamingResponse):
    """Always watches for the client going away, even while no chunk is due (a queued request
    produces nothing for a while): the stream is then cancelled, which aborts its requests."""

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send):
        stream_task = asyncio.ensure_future(self.stream_response(send))
        watch_task = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stream_task, watch_task):
                t.cancel()
            err, _ = await asyncio.gather(stream_task, watch_task, return_exceptions=True)
        if isinstance(err, Exception) and not isinstance(err, OSError):  # a bug, not a client gone
            raise err


async def _until_disconnect(raw: Request, coro):
    """Run `coro` unless the client leaves first (then it is cancelled; its finally aborts)."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await raw.receive())["type"] != "http.disconnect":
            pass
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "client disconnected")
    return task.result()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None


def _usage(prompt_lens: list[int], completion_tokens: int) -> dict:
    p = sum(prompt_lens)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}


# Line breaks to str.splitlines that JSON leaves raw in strings: escaped, so that clients which
# read an SSE stream with a splitlines-style reader (httpx's aiter_lines) still get whole events.
_SPLITLINES_ONLY = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(obj) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(',', ':')).translate(_SPLITLINES_ONLY)
    return f"data: {text}\n\n"


def _sampled(entry: dict):
    """The sampled token's (id, Logprob): the engine puts it first in each position's dict."""
    return next(iter(entry.items()))


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for entry in entries:
        _, lp = _sampled(entry)
        tok = lp.decoded_token or ""
        tokens.append(tok)
        token_lps.append(lp.logprob)
        tops.append({v.decoded_token: v.logprob for v in entry.values()})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[dict]) -> dict:
    def item(lp):
        tok = lp.decoded_token or ""
        return {"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode("utf-8"))}
    content = []
    for entry in entries:
        _, lp = _sampled(entry)
        top = sorted((v for v in entry.values() if v.rank is not None), key=lambda v: v.rank)
        content.append({**item(lp), "top_logprobs": [item(v) for v in top]})
    return {"content": content}


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, served_names: list[str],
                 max_waiting_requests: Optional[int] = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.served_names = served_names
        self.model_name = served_names[0]
        self.max_waiting = max_waiting_requests
        info = engine.info
        self.max_model_len, self.vocab_size = info.max_model_len, info.vocab_size
        self.kv_tokens = info.num_blocks * info.block_size
        self.draining = False

    # ----- checks shared by every generating endpoint ------------------------------------------------
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model not in self.served_names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], params: SamplingParams, field_name: str) -> None:
        if not ids:
            raise APIError(400, f"{field_name} must not be empty", param=field_name)
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise APIError(400, f"{field_name} has token id {t} outside the vocabulary [0, {self.vocab_size})",
                               param=field_name)
        n, mt = len(ids), params.max_tokens
        if mt is not None and n + mt > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {n + mt} tokens ({n} in the messages, {mt} in the completion). Please "
                           "reduce the length of the messages or completion.", param=field_name,
                           code="context_length_exceeded")
        if n >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"your prompt contains {n} input tokens, which leaves no room for any output "
                           "tokens. Please reduce the length of the input prompt.", param=field_name,
                           code="context_length_exceeded")
        if n + 1 > self.kv_tokens:
            raise APIError(400, f"prompt is {n} tokens but the KV cache holds only {self.kv_tokens}",
                           param=field_name)
        try:
            params.validate_token_ids(self.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0])

    def admit(self) -> None:
        if self.engine.dead is not None:
            raise APIError(503, "the engine is dead", type="server_error", code="engine_dead")
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": "5"})
        if self.max_waiting is not None and self.engine.num_waiting >= self.max_waiting:
            raise APIError(503, f"the server is overloaded: {self.engine.num_waiting} requests are waiting "
                           f"(--max-waiting-requests {self.max_waiting})", type="server_error",
                           code="overloaded", headers={"Retry-After": "1"})

    def _submit(self, prompts: list[list[int]], params: SamplingParams, priority: int, rid: str):
        self.admit()
        return self.engine.generate(prompts, [params.clone() for _ in prompts], priority, rid)

    # ----- /v1/completions ---------------------------------------------------------------------
    def _completion_prompts(self, prompt) -> list[tuple[Optional[str], list[int]]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [(p, self.tokenizer.encode(p, add_special_tokens=True)) if isinstance(p, str) else (None, list(p))
                for p in prompt]

    async def completions(self, req: CompletionRequest, raw: Request):
        self.check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (prompt logprobs)", param="echo")
        prompts = self._completion_prompts(req.prompt)
        params = req.sampling_params(req.max_tokens, req.logprobs)
        for _, ids in prompts:
            self.check_prompt(ids, params, "prompt")
        echo = [(text if text is not None else self.tokenizer.decode(ids)) if req.echo else ""
                for text, ids in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = self._submit([ids for _, ids in prompts], params, req.priority, rid)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        n = req.n
        if req.stream:
            return SSEResponse(self._stream(stream, head, n, req, echo, chat=False))
        choices, prompt_lens = await _until_disconnect(raw, self._collect(stream, len(prompts), n))
        out = []
        for i, ch in enumerate(choices):
            lp = completion_logprobs(ch.logprobs, 0) if req.logprobs is not None else None
            out.append({"index": i, "text": echo[i // n] + "".join(ch.text), "logprobs": lp,
                        "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason})
        return JSONResponse({**head, "choices": out,
                             "usage": _usage(prompt_lens, sum(c.num_tokens for c in choices))})

    # ----- /v1/chat/completions ----------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request):
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        ids = self.chat_prompt(req.message_dicts(), req.add_generation_prompt)
        params = req.sampling_params(req.max_completion_tokens or req.max_tokens,
                                     (req.top_logprobs or 0) if req.logprobs else None)
        self.check_prompt(ids, params, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self._submit([ids], params, req.priority, rid)
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            head["object"] = "chat.completion.chunk"
            return SSEResponse(self._stream(stream, head, req.n, req, [""], chat=True))
        choices, prompt_lens = await _until_disconnect(raw, self._collect(stream, 1, req.n))
        out = [{"index": i, "message": {"role": "assistant", "content": "".join(ch.text)},
                "logprobs": chat_logprobs(ch.logprobs) if req.logprobs else None,
                "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason} for i, ch in enumerate(choices)]
        return JSONResponse({**head, "choices": out,
                             "usage": _usage(prompt_lens, sum(c.num_tokens for c in choices))})

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool,
                    add_special_tokens: bool = False) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # validation (ValueError) or the template's own raise_exception
            raise APIError(400, str(e), param="messages")
        # The template writes its own special tokens, so by default none are added (as vLLM).
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # ----- results -----------------------------------------------------------------------------
    async def _collect(self, stream, num_prompts: int, n: int) -> tuple[list[_Choice], list[int]]:
        choices = [_Choice() for _ in range(num_prompts * n)]
        prompt_lens = [0] * num_prompts
        try:
            async for p, d in stream:
                prompt_lens[p] = d.num_prompt_tokens
                for c in d.completions:
                    ch = choices[p * n + c.index]
                    ch.text.append(c.text)
                    ch.num_tokens += len(c.token_ids)
                    ch.logprobs += c.logprobs or []
                    if c.finish_reason is not None:
                        ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
        except RequestRejected as e:
            raise APIError(400, str(e))
        except EngineDeadError as e:
            raise APIError(503, str(e), type="server_error", code="engine_dead")
        finally:
            stream.close()
        return choices, prompt_lens

    async def _deltas(self, stream, n: int) -> AsyncIterator[tuple[int, int, CompletionDelta]]:
        """(prompt index, choice index, delta) for each step that adds tokens or ends a choice."""
        done = set()
        async for p, d in stream:
            for c in d.completions:
                idx = p * n + c.index
                if idx in done or (not c.token_ids and not c.text and c.finish_reason is None):
                    continue
                if c.finish_reason is not None:
                    done.add(idx)
                yield p, idx, d.num_prompt_tokens, c

    async def _stream(self, stream, head: dict, n: int, req, echo: list[str], chat: bool) -> AsyncIterator[str]:
        usage_opts = req.stream_options
        prompt_lens: dict[int, int] = {}
        generated = 0
        started: set[int] = set()
        offsets: dict[int, int] = {}
        try:
            async for p, idx, num_prompt, c in self._deltas(stream, n):
                prompt_lens[p] = num_prompt
                generated += len(c.token_ids)
                text = c.text
                if idx not in started and echo[p]:
                    text = echo[p] + text
                if chat:
                    delta = {"role": "assistant", "content": text} if idx not in started else {"content": text}
                    lp = chat_logprobs(c.logprobs or []) if req.logprobs else None
                    choice = {"index": idx, "delta": delta, "logprobs": lp}
                else:
                    lp = completion_logprobs(c.logprobs or [], offsets.get(idx, 0)) \
                        if req.logprobs is not None else None
                    choice = {"index": idx, "text": text, "logprobs": lp}
                offsets[idx] = offsets.get(idx, 0) + len(text)
                started.add(idx)
                choice.update(finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                chunk = {**head, "choices": [choice]}
                if usage_opts and usage_opts.include_usage:
                    chunk["usage"] = _usage(list(prompt_lens.values()), generated) \
                        if usage_opts.continuous_usage_stats else None
                yield _sse(chunk)
            if usage_opts and usage_opts.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(list(prompt_lens.values()), generated)})
        except (RequestRejected, EngineDeadError) as e:
            err = APIError(400 if isinstance(e, RequestRejected) else 503, str(e),
                           type="invalid_request_error" if isinstance(e, RequestRejected) else "server_error")
            yield _sse(err.body())
        finally:
            stream.close()
        yield "data: [DONE]\n\n"

"""The FastAPI app: OpenAI routes, vLLM's utility routes, OpenAI-shaped errors, bearer auth."""
from __future__ import annotations

import hmac
import time
from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import spruce
from spruce.engine.async_engine import AsyncEngine
from spruce.server.metrics import ServerMetrics
from spruce.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeChatRequest, TokenizeCompletionRequest)
from spruce.server.serving import OpenAIServing
from spruce.tokenizer import Tokenizer


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    parts, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def build_app(engine: AsyncEngine, tokenizer: Tokenizer, served_names: list[str],
              api_key: Optional[str] = None, max_waiting_requests: Optional[int] = None) -> FastAPI:
    app = FastAPI(title="Spruce", version=spruce.__version__)
    serving = OpenAIServing(engine, tokenizer, served_names, max_waiting_requests)
    metrics = ServerMetrics(engine, served_names[0], engine.info.max_model_len)
    app.state.serving, app.state.metrics = serving, metrics
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return _error_response(APIError(exc.status_code, str(exc.detail),
                                        code="not_found" if exc.status_code == 404 else None))

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            # As vLLM: only the OpenAI routes need the key; health, metrics and tokenize stay open
            # to orchestrators and scrapers.
            if request.url.path.startswith("/v1"):
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return _error_response(APIError(401, "Incorrect API key provided.", code="invalid_api_key"))
            return await call_next(request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await serving.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await serving.chat(req, raw)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": started, "owned_by": "spruce",
             "root": engine.info.model_name, "parent": None, "max_model_len": engine.info.max_model_len}
            for name in served_names]}

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return _error_response(APIError(503, "the engine is dead", type="server_error", code="engine_dead"))
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": spruce.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(req: Union[TokenizeCompletionRequest, TokenizeChatRequest]):
        serving.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            ids = serving.chat_prompt([m.model_dump(exclude_none=True) for m in req.messages],
                                      req.add_generation_prompt, req.add_special_tokens)
        else:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.info.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        serving.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < engine.info.vocab_size]
        if bad:
            raise APIError(400, f"tokens has token id {bad[0]} outside the vocabulary "
                           f"[0, {engine.info.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}

    return app

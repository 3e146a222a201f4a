"""`spruce serve`: the engine, the HTTP server around it, and an orderly exit.

Exit codes: 0 after SIGTERM/SIGINT (in-flight requests drained for up to --shutdown-timeout
seconds, then aborted); 1 when the engine dies (after /health has started to fail), so a
supervisor (Kubernetes, Ray, systemd) restarts the replica instead of routing to a dead one.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from spruce.entrypoints.args import add_engine_args, engine_kwargs

logger = logging.getLogger("spruce.server")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) the API answers to (default: MODEL); the first is reported in responses")
    g.add_argument("--api-key", default=os.environ.get("SPRUCE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SPRUCE_API_KEY)")
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help="answer 503 + Retry-After while this many requests wait (default: no bound)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish before abort")
    g.add_argument("--kv-prefault", action=argparse.BooleanOptionalAction, default=True,
                   help="make the whole KV cache resident before serving (seconds at start-up; no page "
                        "faults in the first requests' forwards)")
    g.add_argument("--engine-loop", choices=["process", "thread"], default="process",
                   help="run EngineCore in its own process (default) or in a thread of the server")
    g.add_argument("--disable-uvicorn-access-log", action="store_true")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])


def _make_server(config, on_signal):
    import uvicorn

    class Server(uvicorn.Server):
        # uvicorn re-raises the captured signal after a graceful exit, which would turn a clean
        # drain into death by SIGTERM (exit 143). We own these signals instead.
        @contextlib.contextmanager
        def capture_signals(self):
            handled = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, self.handle_exit) for s in handled}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        def handle_exit(self, sig, frame):
            on_signal(sig)
            super().handle_exit(sig, frame)
    return Server(config)


async def _serve(args, engine_config) -> int:
    import uvicorn

    from spruce.engine.async_engine import AsyncEngine
    from spruce.models.resolve import resolve_model
    from spruce.server.app import build_app
    from spruce.tokenizer import Tokenizer

    mc = engine_config.model_config
    engine = AsyncEngine(engine_config, mode=args.engine_loop)
    start = asyncio.ensure_future(engine.start())
    # The tokenizer loads here while the engine loads its weights in the other process.
    tokenizer = Tokenizer.from_resolved(resolve_model(mc.tokenizer or mc.model, mc.revision))
    info = await start
    names = args.served_model_name or [mc.model]
    app = build_app(engine, tokenizer, names, args.api_key, args.max_waiting_requests)
    serving = app.state.serving

    exit_code = 0
    server = None

    def on_signal(sig):
        if not serving.draining:
            logger.warning("%s: draining (up to %.0fs), then exiting", signal.Signals(sig).name, args.shutdown_timeout)
        serving.draining = True

    def on_engine_dead(why: str):
        nonlocal exit_code
        logger.error("engine died; exiting:\n%s", why)
        exit_code = 1
        if server is not None:
            server.should_exit = True
    engine.on_dead.append(on_engine_dead)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            access_log=not args.disable_uvicorn_access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="off")
    server = _make_server(config, on_signal)
    print(f"[spruce] serving {', '.join(names)} ({info.dtype}, {args.engine_loop} engine loop, max_model_len "
          f"{info.max_model_len}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        await server.serve()
    finally:
        await engine.shutdown(timeout=10)
    if not server.started and exit_code == 0:
        return 1  # could not bind the port (uvicorn logged why)
    return exit_code


def serve(args: argparse.Namespace) -> int:
    from spruce.config import EngineConfig
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kwargs = engine_kwargs(args)
    kwargs["max_waiting_requests"] = args.max_waiting_requests
    kwargs["kv_prefault"] = args.kv_prefault
    config = EngineConfig.from_kwargs(**kwargs)
    try:
        return asyncio.run(_serve(args, config))
    except Exception as e:
        from spruce.engine.async_engine import EngineDeadError
        if isinstance(e, EngineDeadError):
            print(f"spruce serve: {e}", file=sys.stderr)
            return 1
        raise

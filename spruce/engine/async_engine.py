"""The engine loop behind the server, apart from the HTTP event loop.

EngineCore.step() is synchronous, and its Python parts (scheduling, sampler bookkeeping,
detokenization) hold the GIL. By default it runs in its own process, so HTTP parsing, JSON and
SSE writing never wait on a step and a step never waits on them; `mode="thread"` runs it in a
thread of the server process instead. Measured at 16 concurrent streams on 2 shared cores the
two were within run-to-run noise (the HTTP side costs ~0.5 ms of CPU per streamed token); the
process stays the default for isolation (a dead engine is seen and reported by a live HTTP
side) and for headroom as streams multiply. Both modes speak the same messages:

  to the engine    ("add", request_id, prompt_token_ids, params, priority, arrival_time)
                   ("abort", [request_ids])   ("shutdown",)
  from the engine  ("ready", EngineInfo)   ("dead", traceback text)
                   ("outputs", [RequestDelta], [(request_id, error)], EngineStats, step_time)

Only deltas cross the boundary (new text, token ids and logprobs of each step), never whole
outputs, so a long generation costs O(tokens) to ship, not O(tokens^2).
"""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from spruce.config import EngineConfig
from spruce.outputs import Logprob, RequestMetrics
from spruce.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop itself failed; no request can be served any more."""


class RequestRejected(ValueError):
    """The engine refused one request (its own failure; the engine goes on)."""


@dataclass
class EngineInfo:
    model_name: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    dtype: str


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_accepted: int = 0  # "add" commands the engine has processed (see AsyncEngine.num_waiting)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: tuple = ()


@dataclass
class CompletionDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str]
    stop_reason: Optional[int | str]


@dataclass
class RequestDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    metrics: Optional[RequestMetrics]


def _to_delta(out) -> RequestDelta:
    comps = []
    for c in out.outputs:
        text, ids = out.deltas.get(c.index, ("", []))
        lps = None
        if c.logprobs is not None:
            end = len(c.token_ids)
            lps = c.logprobs[end - len(ids):end]
        comps.append(CompletionDelta(c.index, text, list(ids), lps, c.finish_reason, c.stop_reason))
    return RequestDelta(out.request_id, comps, out.finished, len(out.prompt_token_ids), out.num_cached_tokens,
                        out.metrics)


def _stats(engine, accepted: int) -> EngineStats:
    s, kv = engine.scheduler, engine.kv_manager
    spec = engine.spec_stats
    return EngineStats(s.num_running, s.num_waiting, kv.usage, kv.prefix_cache_queries, kv.prefix_cache_hits,
                       s.stats.num_preemptions, s.stats.num_prompt_tokens, s.stats.num_generation_tokens, accepted,
                       spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens,
                       tuple(spec.num_accepted_tokens_per_pos))


def _load(config: EngineConfig):
    from spruce.engine.core import EngineCore
    engine = EngineCore(config)
    info = EngineInfo(engine.model_name, engine.max_model_len, engine.vocab_size, engine.num_blocks,
                      config.cache_config.block_size, str(engine.dtype).replace("torch.", ""))
    return engine, info


def run_engine_loop(engine, poll: Callable[[Optional[float]], list], send: Callable[[tuple], None]) -> None:
    """Serve commands until ("shutdown",). `poll(None)` blocks for the next commands (idle engine);
    `poll(0)` returns what is queued. An exception out of step() ends the loop: it is the engine's
    failure, not one request's, and the caller reports the engine dead."""
    accepted = 0
    while True:
        commands = poll(0 if engine.has_unfinished_requests() else None)
        outputs, errors = [], []
        for cmd in commands:
            if cmd[0] == "add":
                _, rid, prompt, params, priority, arrival = cmd
                accepted += 1
                try:
                    engine.add_request(prompt, params, request_id=rid, priority=priority, arrival_time=arrival)
                except Exception as e:  # a bad request fails alone
                    errors.append((rid, str(e) or type(e).__name__))
            elif cmd[0] == "abort":
                outputs += engine.abort_request(cmd[1])
            elif cmd[0] == "shutdown":
                return
        if engine.has_unfinished_requests():
            outputs += engine.step()
        if outputs or errors or commands:
            send(("outputs", [_to_delta(o) for o in outputs], errors, _stats(engine, accepted), time.time()))


def _engine_process_main(config: EngineConfig, cmd_conn, out_conn) -> None:
    # The server process owns shutdown (drain, then ("shutdown",)); a terminal's Ctrl-C or a
    # group-wide SIGTERM must not kill the engine under in-flight requests. If the server dies,
    # recv() sees EOF and this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine, info = _load(config)
        out_conn.send(("ready", info))

        def poll(timeout):
            cmds = []
            if timeout is None or cmd_conn.poll(timeout):
                cmds.append(cmd_conn.recv())
                while cmd_conn.poll(0):
                    cmds.append(cmd_conn.recv())
            return cmds
        run_engine_loop(engine, poll, out_conn.send)
    except (EOFError, BrokenPipeError):
        return
    except BaseException:
        try:
            out_conn.send(("dead", traceback.format_exc()))
        except Exception:
            pass
        raise SystemExit(1)


class RequestStream:
    """The deltas of one API request, which may be several engine requests (a list of prompts).
    Iterating yields (prompt index, RequestDelta); close() aborts whatever has not finished."""

    def __init__(self, engine: "AsyncEngine", request_ids: list[str]):
        self._engine = engine
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._unfinished = set(request_ids)
        self._queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestDelta]:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Exception):
            self.close()
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
            self._engine._streams.pop(item.request_id, None)
        return self._index[item.request_id], item

    def close(self) -> None:
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()


class AsyncEngine:
    """Front half of the engine, living on the HTTP event loop. `hooks` see every delta (metrics),
    whether or not its client is still listening."""

    def __init__(self, config: EngineConfig, mode: str = "process"):
        if mode not in ("process", "thread"):
            raise ValueError(f"engine loop mode must be process|thread, got {mode!r}")
        self.config, self.mode = config, mode
        self.info: Optional[EngineInfo] = None
        self.stats = EngineStats()
        self.dead: Optional[str] = None
        self.hooks: list[Callable[[RequestDelta, float], None]] = []
        self.on_dead: list[Callable[[str], None]] = []
        self._streams: dict[str, RequestStream] = {}
        self._sent = 0
        self._ids = itertools.count()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready: Optional[asyncio.Future] = None
        self._cmds: queue.Queue = queue.Queue()
        self._proc = self._thread = None
        self._closing = False

    # ----- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> EngineInfo:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        if self.mode == "process":
            self._start_process()
        else:
            self._thread = threading.Thread(target=self._thread_main, name="spruce-engine", daemon=True)
            self._thread.start()
        self.info = await self._ready
        return self.info

    def _start_process(self) -> None:
        # spawn, not fork: the child must not inherit this process's threads or OpenMP state.
        ctx = mp.get_context("spawn")
        cmd_r, cmd_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_engine_process_main, args=(self.config, cmd_r, out_w),
                                 name="spruce-engine", daemon=True)
        self._proc.start()
        cmd_r.close()
        out_w.close()

        # A full pipe must block a helper thread, never the event loop.
        def sender():
            while True:
                cmd = self._cmds.get()
                try:
                    cmd_w.send(cmd)
                except (BrokenPipeError, OSError):
                    return
                if cmd[0] == "shutdown":
                    return

        def reader():
            while True:
                try:
                    msg = out_r.recv()
                except (EOFError, OSError):
                    self._proc.join(timeout=5)
                    msg = ("dead", f"engine process exited (code {self._proc.exitcode})")
                    if self._closing:
                        return
                self._deliver(msg)
                if msg[0] == "dead":
                    return
        threading.Thread(target=sender, name="spruce-engine-send", daemon=True).start()
        threading.Thread(target=reader, name="spruce-engine-recv", daemon=True).start()

    def _thread_main(self) -> None:
        try:
            engine, info = _load(self.config)
            self._deliver(("ready", info))

            def poll(timeout):
                cmds = [self._cmds.get()] if timeout is None else []
                while True:
                    try:
                        cmds.append(self._cmds.get_nowait())
                    except queue.Empty:
                        return cmds
            run_engine_loop(engine, poll, self._deliver)
        except BaseException:
            self._deliver(("dead", traceback.format_exc()))

    def _deliver(self, msg: tuple) -> None:
        """From the engine's thread: hand a message to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._handle, msg)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "outputs":
            _, deltas, errors, stats, step_time = msg
            self.stats = stats
            for d in deltas:
                for hook in self.hooks:
                    hook(d, step_time)
                stream = self._streams.get(d.request_id)
                if stream is not None:
                    stream._put(d)
            for rid, err in errors:
                stream = self._streams.pop(rid, None)
                if stream is not None:
                    stream._put(RequestRejected(err))
        elif kind == "ready":
            self._ready.set_result(msg[1])
        elif kind == "dead":
            self._set_dead(msg[1])

    def _set_dead(self, why: str) -> None:
        if self.dead is not None:
            return
        self.dead = why
        if not self._ready.done():
            self._ready.set_exception(EngineDeadError(f"engine failed to start:\n{why}"))
        for stream in set(self._streams.values()):
            stream._put(EngineDeadError("the engine died; see the server log"))
        self._streams.clear()
        for cb in self.on_dead:
            cb(why)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the loop, and wait for it (then kill it)."""
        self._closing = True
        if self._streams and self.dead is None:
            self.abort(list(self._streams))
        self._cmds.put(("shutdown",))
        if self._proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        elif self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    # ----- requests ----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Waiting requests, counting adds sent but not yet seen by the engine."""
        return self.stats.num_waiting + (self._sent - self.stats.num_accepted)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], priority: int = 0,
                 request_id: Optional[str] = None) -> RequestStream:
        """Queue prompts (token ids, already validated) as engine requests under one stream."""
        if self.dead is not None:
            raise EngineDeadError("the engine is dead")
        base = request_id or f"req-{next(self._ids)}"
        ids = [base] if len(prompts) == 1 else [f"{base}-{i}" for i in range(len(prompts))]
        stream = RequestStream(self, ids)
        now = time.time()
        for rid, prompt, p in zip(ids, prompts, params):
            self._streams[rid] = stream
            self._sent += 1
            self._cmds.put(("add", rid, prompt, p, priority, now))
        return stream

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)
        if request_ids and self.dead is None:
            self._cmds.put(("abort", list(request_ids)))

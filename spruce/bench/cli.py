"""`spruce bench throughput` (W1) and `spruce bench latency` (W2): Spruce and its peers on the same
token ids in one invocation, each side's numbers and the ratios. `spruce bench serve` (W3) is the
online benchmark against a running server (spruce/bench/serve.py)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from spruce.entrypoints.args import add_engine_args, engine_kwargs


def add_bench_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, workload, helptext in (("throughput", "W1", "W1: 64 prompts x 128 tokens, offline"),
                                     ("latency", "W2", "W2: one stream, 256 tokens")):
        p = sub.add_parser(name, help=helptext)
        add_engine_args(p)
        p.add_argument("--peers", default="", help="comma list of peers to run too: hf,vllm")
        p.add_argument("--peer-dtype", default=None, help="dtype for the peers (default: Spruce's)")
        p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
        p.add_argument("--num-prompts", type=int, default=None, help="W1 only: fewer prompts (smoke runs)")
        p.add_argument("--max-tokens", type=int, default=None, help="override output length (smoke runs)")
        p.add_argument("--output-json", default=None, help="write all results here")
        p.set_defaults(func=_run, workload=workload)
    from spruce.bench.spec import add_spec_bench
    add_spec_bench(sub)
    from spruce.bench.serve import add_serve_bench_args
    add_serve_bench_args(sub.add_parser("serve", help="online serving against a running server "
                                        "(`vllm bench serve` flags and result keys)"))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _run(args) -> int:
    from spruce.bench.peers import run_peer
    from spruce.bench.spruce_runner import run_spruce
    from spruce.bench.workloads import build_workload, load_tokenizer, prompt_lengths_summary

    kwargs = engine_kwargs(args)
    extra = {"repeats": args.repeats, "model": kwargs["model"]}
    if args.max_tokens:
        extra["max_tokens"] = args.max_tokens
    if args.workload == "W1" and args.num_prompts:
        extra["num_prompts"] = args.num_prompts
    wl = build_workload(args.workload, load_tokenizer(kwargs["model"]), **extra)
    header = {"workload": wl.name, "model": kwargs["model"], "commit": _commit(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "threads": kwargs.get("num_threads") or os.cpu_count(), "prompts": prompt_lengths_summary(wl.prompts),
              "max_tokens": wl.max_tokens, "greedy": True, "ignore_eos": True, "prefix_cache": "cold each run"}
    print("[bench] " + json.dumps(header), file=sys.stderr)
    results = {"spruce": run_spruce(wl, kwargs)}
    _print_side(wl.name, results["spruce"])
    peer_dtype = args.peer_dtype or results["spruce"]["dtype"]
    for peer in [p.strip() for p in args.peers.split(",") if p.strip()]:
        try:
            results[peer] = run_peer(peer, wl.name, wl.prompts, wl.settings(), peer_dtype)
        except Exception as e:  # one peer failing must not lose the others' numbers
            results[peer] = {"error": str(e)[-2000:]}
        _print_side(wl.name, results[peer], peer)
    _print_ratios(wl.name, results)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"header": header, "results": _strip(results)}, f, indent=1)
    return 0


def _strip(results: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "output_token_ids"} for k, v in results.items()}


def _print_side(workload: str, r: dict, name: str = "spruce") -> None:
    if "error" in r:
        print(f"{name:>8}: FAILED: {r['error'][-400:]}")
        return
    rss = r.get("peak_rss_total_mb", r.get("peak_rss_mb"))
    if workload == "W1":
        print(f"{name:>8}: {r['output_tok_s']:8.1f} output tok/s  {r['total_tok_s']:8.1f} total tok/s  "
              f"peak RSS {rss:.0f} MB  dtype {r.get('dtype')}")
    else:
        print(f"{name:>8}: TTFT {r['ttft_ms']:8.1f} ms  decode {r['decode_tok_s']:7.1f} tok/s  "
              f"peak RSS {rss:.0f} MB  dtype {r.get('dtype')}")


def _print_ratios(workload: str, results: dict) -> None:
    s = results["spruce"]
    for name, r in results.items():
        if name == "spruce" or "error" in r:
            continue
        if workload == "W1":
            print(f"spruce / {name}: output tok/s x{s['output_tok_s'] / r['output_tok_s']:.2f}")
        else:
            print(f"spruce / {name}: decode tok/s x{s['decode_tok_s'] / r['decode_tok_s']:.2f}, "
                  f"TTFT x{s['ttft_ms'] / r['ttft_ms']:.2f} (lower is better)")

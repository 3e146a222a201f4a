"""`spruce bench spec`: W4 (shared/bench/WORKLOADS.md) with and without speculative decoding.

Every mode runs on the same loaded target, the same chat-templated W4 prompts, greedy, max_tokens
256, stop at EOS; batch B submits B prompts at a time and waits for all of them. Reported per mode
and batch: generated tokens / decode seconds (decode = after each group's first token), mean accepted
length per verification step (overall and per prompt kind), the ratio to no speculation, and whether
the greedy text equals the non-speculative text token for token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path

from spruce.entrypoints.args import add_engine_args, engine_kwargs
from spruce.sampling_params import SamplingParams

# name -> speculative_config (None: no speculation). {draft} is --draft's checkpoint.
MODES = {
    "none": None,
    "ngram-4": {"method": "ngram", "num_speculative_tokens": 4},
    "ngram-8": {"method": "ngram", "num_speculative_tokens": 8},
    "early_exit-4": {"method": "early_exit", "num_speculative_tokens": 4},
    "early_exit-8": {"method": "early_exit", "num_speculative_tokens": 8},
    "draft-4": {"method": "draft_model", "model": "{draft}", "num_speculative_tokens": 4},
    "draft-8": {"method": "draft_model", "model": "{draft}", "num_speculative_tokens": 8},
    "draft-specinfer": {"method": "draft_model", "model": "{draft}", "tree": "specinfer"},
    # Trees as deep as draft-4, wide where a weak draft's misses are: at the root (<3,1,1,1>), or
    # the 3 paths of highest cumulative draft probability at every depth (beam).
    "draft-tree4": {"method": "draft_model", "model": "{draft}", "tree": [3, 1, 1, 1]},
    "draft-beam4": {"method": "draft_model", "model": "{draft}", "num_speculative_tokens": 4,
                    "beam_width": 3},
    "merged": {"method": "merged", "tree": "specinfer", "methods": [
        {"method": "draft_model", "model": "{draft}"}, {"method": "ngram"}]},
    # {speculator}: `spruce distill --kind mlp_speculator`'s checkpoint (--speculator).
    "mlp-4": {"method": "mlp_speculator", "model": "{speculator}", "num_speculative_tokens": 4},
    "mlp-8": {"method": "mlp_speculator", "model": "{speculator}", "num_speculative_tokens": 8},
    "mlp-tree4": {"method": "mlp_speculator", "model": "{speculator}", "tree": [3, 1, 1, 1]},
    "mlp-specinfer": {"method": "mlp_speculator", "model": "{speculator}", "tree": "specinfer"},
    "mlp-beam4": {"method": "mlp_speculator", "model": "{speculator}", "num_speculative_tokens": 4,
                  "beam_width": 3},
    "merged-mlp": {"method": "merged", "tree": [3, 1, 1, 1], "methods": [
        {"method": "mlp_speculator", "model": "{speculator}"}, {"method": "ngram"}]},
    # Suffix decoding over the request's own tokens, finished requests' outputs and {datastore}
    # (--datastore: a distill directory's corpus.npy); "-local" without the datastore.
    "suffix": {"method": "suffix", "model": "{datastore}", "num_speculative_tokens": 8, "max_tree_nodes": 16},
    "suffix-local": {"method": "suffix", "num_speculative_tokens": 8, "max_tree_nodes": 16},
    "merged-mlp-suffix": {"method": "merged", "tree": [3, 1, 1, 1], "methods": [
        {"method": "mlp_speculator", "model": "{speculator}"},
        {"method": "suffix", "model": "{datastore}", "num_speculative_tokens": 8, "max_tree_nodes": 16}]},
}


def add_spec_bench(sub) -> None:
    p = sub.add_parser("spec", help="W4: speculative decoding modes vs. none")
    add_engine_args(p)
    p.add_argument("--modes", default="none,ngram-4,ngram-8,early_exit-4",
                   help=f"comma list from: {', '.join(MODES)}")
    p.add_argument("--draft", default=None, help="draft checkpoint (spruce distill --out DIR) for draft modes")
    p.add_argument("--speculator", default=None,
                   help="MLP speculator (spruce distill --kind mlp_speculator --out DIR) for mlp modes")
    p.add_argument("--datastore", default=None,
                   help="suffix modes' datastore: a distill directory (its corpus.npy) or the file; "
                        "default: --speculator's, else --draft's")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompts-file", default=None, help="default: the packaged W4 prompts")
    p.add_argument("--max-num-seqs-for-spec", type=int, default=None,
                   help="speculate whenever at most this many requests run, with the measured gate off "
                        "(default: the engine's load and measured adaptation; a large value forces "
                        "speculation at every batch size)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all modes, interleaved (none, A, B, none, A, B, ...); each mode "
                        "reports its median round, so a neighbour's burst of load hits every mode alike")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)


def load_w4(path=None) -> list[dict]:
    text = Path(path).read_text() if path else \
        resources.files("spruce.bench").joinpath("data/prompts_w4.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _config(mode: str, draft, max_num_seqs_for_spec=None, speculator=None, datastore=None):
    cfg = MODES[mode]
    if cfg is None:
        return None
    text = json.dumps(cfg)
    if "{draft}" in text:
        if not draft:
            raise ValueError(f"mode {mode!r} needs --draft DIR (make one with `spruce distill`)")
        text = text.replace("{draft}", draft)
    if "{speculator}" in text:
        if not speculator:
            raise ValueError(f"mode {mode!r} needs --speculator DIR (make one with "
                             "`spruce distill --kind mlp_speculator`)")
        text = text.replace("{speculator}", speculator)
    if "{datastore}" in text:
        datastore = datastore or speculator or draft
        if not datastore:
            raise ValueError(f"mode {mode!r} needs --datastore (a `spruce distill` directory)")
        text = text.replace("{datastore}", datastore)
    cfg = json.loads(text)
    if max_num_seqs_for_spec is not None:   # forced: the measured gate is off too
        cfg["max_num_seqs_for_spec"] = max_num_seqs_for_spec
        cfg["adaptive"] = False
    return cfg


def _run_mode(llm, prompts, kinds, batch: int, max_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    tokens, decode_s, outs = 0, 0.0, []
    for i in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        group = llm.generate(prompts[i:i + batch], params, use_tqdm=False)
        t1 = time.perf_counter()
        first = min(o.metrics.first_token_time for o in group)
        start = min(o.metrics.arrival_time for o in group)
        decode_s += (t1 - t0) - (first - start)
        tokens += sum(len(o.outputs[0].token_ids) - 1 for o in group)
        outs += group
    by_kind = defaultdict(lambda: [0, 0])
    for o, kind in zip(outs, kinds):
        by_kind[kind][0] += o.metrics.num_spec_steps
        by_kind[kind][1] += o.metrics.num_spec_accepted
    steps = sum(v[0] for v in by_kind.values())
    return {"tok_s": tokens / decode_s, "tokens": tokens,
            "mean_accepted_length": (1 + sum(v[1] for v in by_kind.values()) / steps) if steps else None,
            "per_kind": {k: (1 + a / s) if s else None for k, (s, a) in sorted(by_kind.items())},
            "token_ids": [o.outputs[0].token_ids for o in outs]}


def run(args) -> int:
    from spruce.config import EngineConfig
    from spruce.engine.core import load
    from spruce.entrypoints.llm import LLM

    kwargs = engine_kwargs(args)
    loaded = load(EngineConfig.from_kwargs(**{k: kwargs[k] for k in ("model", "dtype", "device", "tokenizer")}))
    rows = load_w4(args.prompts_file)[:args.num_prompts]
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(r["messages"], add_generation_prompt=True), add_special_tokens=False)
               for r in rows]
    kinds = [r.get("kind", "?") for r in rows]
    # Warm-up text outside W4: a suffix cache must not start a mode with W4's own answers.
    warm = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True),
                      add_special_tokens=False)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    modes = ["none"] + [m for m in modes if m != "none"]   # the baseline of every ratio, run first
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    results: dict = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        rounds: dict = defaultdict(list)
        for rep in range(args.repeats):
            for mode in modes:
                cfg = _config(mode, args.draft, args.max_num_seqs_for_spec, args.speculator, args.datastore)
                llm = LLM(_loaded=loaded, speculative_config=cfg,
                          **{k: v for k, v in kwargs.items()
                             if k not in ("model", "dtype", "device", "tokenizer", "speculative_config")})
                _run_mode(llm, [warm] * min(batch, 2), kinds, batch, 8)  # warm-up
                r = _run_mode(llm, prompts, kinds, batch, args.max_tokens)
                rounds[mode].append(r)
                if args.repeats > 1:
                    print(f"  round {rep + 1}/{args.repeats} batch {batch} {mode}: {r['tok_s']:.1f} tok/s", flush=True)
        base_runs = rounds["none"]
        for mode in modes:
            runs = rounds[mode]
            r = dict(sorted(runs, key=lambda x: x["tok_s"])[len(runs) // 2])
            r["runs_tok_s"] = [x["tok_s"] for x in runs]
            r["tok_s"] = statistics.median(r["runs_tok_s"])
            # Each round's ratio pairs runs minutes apart; their median follows the machine's drift
            # less than a ratio of medians would.
            r["round_speedups"] = [x["tok_s"] / b["tok_s"] for x, b in zip(runs, base_runs)]
            r["speedup"] = statistics.median(r["round_speedups"])
            r["lossless"] = all(x["token_ids"] == b["token_ids"] for x, b in zip(runs, base_runs)) \
                and all(x["token_ids"] == base_runs[0]["token_ids"] for x in runs)
            results[(mode, batch)] = r
            mal = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
            kinds_s = " ".join(f"{k}={v:.2f}" for k, v in r["per_kind"].items() if v)
            per_round = "" if len(runs) == 1 else \
                " (rounds x" + "/".join(f"{x:.2f}" for x in r["round_speedups"]) + ")"
            print(f"batch {batch:>2} {mode:<16} {r['tok_s']:7.1f} tok/s  x{r['speedup']:.2f}{per_round}  "
                  f"accepted len {mal}  {kinds_s}  lossless={r['lossless']}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({f"{m}@{b}": {k: v for k, v in r.items() if k != "token_ids"}
                       for (m, b), r in results.items()}, f, indent=1)
    return 0 if all(r["lossless"] for r in results.values()) else 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser()
    add_spec_bench(parser.add_subparsers(dest="bench"))
    a = parser.parse_args(["spec"] + sys.argv[1:])
    sys.exit(a.func(a))

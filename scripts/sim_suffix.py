"""Orientation probe (not a benchmark): suffix decoding replayed on W4's greedy text, no timing.

    .venv/bin/python scripts/sim_suffix.py DATASTORE [--threshold T] [--no-evidence] [--row-costs C] [config JSON ...]
    # e.g. scripts/sim_suffix.py drafts/smollm2-135m-mlp --threshold 0.3 '{}' '{"model": null}'

Generates W4's greedy answers once (cached in bench_results/w4_greedy.json), then replays each
answer step by step at batch 1: the suffix proposer drafts on the text so far, the per-node cut
keeps what clears the threshold (the engine fits it to the machine: ~0.1 at batch 1, ~0.3 at
batch 4 on the Zen 4 VM), and the greedy walk accepts what the answer really continues with. The
machine's noise (+-25% between runs on the dev VMs) hides the differences between configs; this
does not. It prints tokens per step, verified draft rows per step and the speedup they would give
if a step of R rows cost `row_costs[R]` plain steps. The default table is the Zen 4 VM's in bf16
(scripts/probe_verify_rows.py, 2026-12-07): rows 2-4 share one pass of the bf16 dot kernel, a
5th starts another. `--row-costs 0.11` prices every row alike instead. `--no-evidence` puts every
proposal in one calibration class (as before Proposal.evidence). Each config JSON is merged over
{"method": "suffix", "num_speculative_tokens": 8, "max_tree_nodes": 16, "model": DATASTORE}.
"""
import argparse
import json
import sys
from pathlib import Path

from spruce.config import SpeculativeConfig
from spruce.sampling_params import SamplingParams
from spruce.spec.budget import AcceptanceRecord, cut_trees
from spruce.spec.suffix import SuffixProposer

CACHE = Path("bench_results/w4_greedy.json")
# Cost of one batch-1 step with R query rows, in plain (1-row) steps: Zen 4 VM, bf16.
ZEN4_ROW_COSTS = (1.0, 1.064, 1.11, 1.152, 1.372, 1.43, 1.48, 1.531,
                  1.763, 1.85, 1.93, 2.01, 2.098, 2.18, 2.26, 2.344)


def greedy_answers() -> list[dict]:
    if CACHE.is_file():
        return json.loads(CACHE.read_text())
    from spruce.bench.spec import load_w4
    from spruce.entrypoints.llm import LLM
    llm = LLM("smollm2-135m")
    tok = llm.tokenizer
    rows = load_w4()
    prompts = [tok.encode(tok.apply_chat_template(r["messages"], add_generation_prompt=True),
                          add_special_tokens=False) for r in rows]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256), use_tqdm=False)
    data = [{"kind": r["kind"], "prompt": p, "output": list(o.outputs[0].token_ids)}
            for r, p, o in zip(rows, prompts, outs)]
    CACHE.parent.mkdir(exist_ok=True)
    CACHE.write_text(json.dumps(data))
    return data


class _Request:
    def __init__(self, prompt, out):
        self.all_token_ids = prompt + out
        self.num_prompt_tokens, self.num_output_tokens = len(prompt), len(out)
        self.sampling_params = SamplingParams(temperature=0)


def replay(data, cfg: dict, threshold: float, row_costs) -> tuple[float, float, float]:
    """Tokens per step, draft rows per step, tokens per plain-step cost."""
    proposer = SuffixProposer(SpeculativeConfig.parse(cfg))
    prior = AcceptanceRecord()
    tokens = steps = rows = 0
    cost = 0.0
    for d in data:
        prompt, out = d["prompt"], d["output"]
        record, i = AcceptanceRecord(), 0
        while i < len(out):
            tree = proposer.propose([_Request(prompt, out[:i])], threshold)[0] if i < len(out) - 1 else None
            if tree is not None:
                tree = cut_trees([tree], [record], prior, 1, 16, threshold)[0]
            accepted, u = 0, 0
            if tree is not None:
                rows += len(tree) - 1
                while True:
                    nxt = next((c for c in tree.children(u)
                                if i + accepted < len(out) and tree.tokens[c] == out[i + accepted]), None)
                    if nxt is None:
                        break
                    u, accepted = nxt, accepted + 1
            cost += row_costs(1 if tree is None else len(tree))
            emitted = out[i:i + accepted + 1]
            if tree is not None:
                record.record(tree, emitted)
                prior.record(tree, emitted)
            tokens, steps, i = tokens + len(emitted), steps + 1, i + len(emitted)
        proposer.observe_finished([_Request(prompt, out)])
    return tokens / steps, rows / steps, tokens / cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datastore")
    ap.add_argument("configs", nargs="*", help="config JSON merged over the suffix defaults")
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--row-costs", default=None,
                    help="one float (each draft row costs that much of a plain step) or a "
                         "comma-separated cost per row count 1..16 (default: the Zen 4 VM's)")
    ap.add_argument("--no-evidence", action="store_true",
                    help="calibrate all suffix proposals in one class")
    args = ap.parse_intermixed_args()
    table = ZEN4_ROW_COSTS if args.row_costs is None else tuple(map(float, args.row_costs.split(",")))
    if len(table) == 1:
        row_costs = lambda r, c=table[0]: 1 + c * (r - 1)  # noqa: E731
    elif len(table) >= 16:
        row_costs = lambda r: table[r - 1]  # noqa: E731
    else:
        sys.exit("--row-costs: one value or a cost for each row count 1..16")
    if args.no_evidence:
        import spruce.spec.suffix as suffix_module
        suffix_module.evidence_class = lambda source, match_len: 0
    data = greedy_answers()
    base = {"method": "suffix", "num_speculative_tokens": 8, "max_tree_nodes": 16, "model": args.datastore}
    for over in [json.loads(c) for c in args.configs] or [{}, {"tree": [1]}, {"model": None}]:
        per_step, rows, speedup = replay(data, {**base, **over}, args.threshold, row_costs)
        print(f"{json.dumps(over):<50} tokens/step {per_step:.2f}  rows/step {rows:.2f}  "
              f"x{speedup:.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Orientation probe (not a benchmark): suffix decoding replayed on W4's greedy text, no timing.

    .venv/bin/python scripts/sim_suffix.py DATASTORE [row_cost] [config JSON ...]
    # e.g. scripts/sim_suffix.py drafts/smollm2-135m-mlp 0.11 '{}' '{"tree": [1]}' '{"model": null}'

Generates W4's greedy answers once (cached in bench_results/w4_greedy.json), then replays each
answer step by step at batch 1: the suffix proposer drafts on the text so far, the per-node cut
keeps what clears the threshold (0.1 here; the engine fits it to the machine), and the greedy walk
accepts what the answer really continues with. The machine's noise (+-25% between runs on the dev
VMs) hides the differences between configs; this does not: it prints tokens per step, verified
draft rows per step and the speedup they would give if a row cost `row_cost` of a plain step
(0.11: the bf16 Zen 4 VM at batch 1, scripts/probe_verify_rows.py). Each config JSON is merged
over {"method": "suffix", "num_speculative_tokens": 8, "max_tree_nodes": 16, "model": DATASTORE}.
"""
import json
import sys
from pathlib import Path

from spruce.config import SpeculativeConfig
from spruce.sampling_params import SamplingParams
from spruce.spec.budget import AcceptanceRecord, cut_trees
from spruce.spec.suffix import SuffixProposer

CACHE = Path("bench_results/w4_greedy.json")
THRESHOLD = 0.1


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


def replay(data, cfg: dict) -> tuple[float, float]:
    proposer = SuffixProposer(SpeculativeConfig.parse(cfg))
    prior = AcceptanceRecord()
    tokens = steps = rows = 0
    for d in data:
        prompt, out = d["prompt"], d["output"]
        record, i = AcceptanceRecord(), 0
        while i < len(out):
            tree = proposer.propose([_Request(prompt, out[:i])], THRESHOLD)[0] if i < len(out) - 1 else None
            if tree is not None:
                tree = cut_trees([tree], [record], prior, 1, 16, THRESHOLD)[0]
            accepted, u = 0, 0
            if tree is not None:
                rows += len(tree) - 1
                while True:
                    nxt = next((c for c in tree.children(u)
                                if i + accepted < len(out) and tree.tokens[c] == out[i + accepted]), None)
                    if nxt is None:
                        break
                    u, accepted = nxt, accepted + 1
            emitted = out[i:i + accepted + 1]
            if tree is not None:
                record.record(tree, emitted)
                prior.record(tree, emitted)
            tokens, steps, i = tokens + len(emitted), steps + 1, i + len(emitted)
        proposer.observe_finished([_Request(prompt, out)])
    return tokens / steps, rows / steps


def main() -> None:
    store = sys.argv[1]
    row_cost = float(sys.argv[2]) if len(sys.argv) > 2 else 0.11
    configs = [json.loads(c) for c in sys.argv[3:]] or [{}, {"tree": [1]}, {"model": None}]
    data = greedy_answers()
    base = {"method": "suffix", "num_speculative_tokens": 8, "max_tree_nodes": 16, "model": store}
    for over in configs:
        per_step, rows = replay(data, {**base, **over})
        print(f"{json.dumps(over):<50} tokens/step {per_step:.2f}  rows/step {rows:.2f}  "
              f"at {row_cost} a row: x{per_step / (1 + row_cost * rows):.2f}", flush=True)


if __name__ == "__main__":
    main()

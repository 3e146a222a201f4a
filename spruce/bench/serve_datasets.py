"""Datasets of `spruce bench serve`, built exactly as `vllm bench serve` builds them, so one seed
gives both tools the same prompts (vllm/benchmarks/datasets: RandomDataset, CustomDataset)."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int


class BenchTokenizer:
    """The few HF tokenizer behaviours vLLM's dataset code relies on, over Spruce's tokenizer
    (which needs no transformers): decode keeps special tokens; vocab_size leaves out added tokens."""

    def __init__(self, name: str):
        from spruce.models.resolve import resolve_model
        from spruce.tokenizer import Tokenizer
        self.tok = Tokenizer.from_resolved(resolve_model(name))
        self.vocab_size = self.tok.backend.get_vocab_size(with_added_tokens=False)
        # HF's all_special_ids: the named specials (bos, eos, unk, pad), not every added token.
        named = (self.tok.token_to_id(t) for t in self.tok.special_tokens_map.values())
        self.all_special_ids = sorted({i for i in named if i is not None})

    def num_special_tokens_to_add(self) -> int:
        return len(self.tok.encode("", add_special_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=True)


def _decode_to_target_len(tok: BenchTokenizer, seq: list[int], target: int, rng: np.random.Generator,
                          max_retry: int = 10) -> tuple[str, list[int], int]:
    """Decode, re-encode, pad or cut until the text re-encodes to `target` tokens (vLLM's
    gen_prompt_decode_to_target_len): N arbitrary ids need not decode to text of N tokens."""
    tries, mismatch = max_retry, 0
    while True:
        prompt = tok.decode(seq)
        seq = tok.encode(prompt, add_special_tokens=False)
        if tries <= 0:
            mismatch = len(seq) - target
            break
        if len(seq) == target:
            break
        if len(seq) < target:
            seq.extend(rng.integers(0, tok.vocab_size, size=target - len(seq)).tolist())
        else:
            seq = seq[:target]
        tries -= 1
    return prompt, seq, mismatch


def sample_random(tok: BenchTokenizer, num_requests: int, input_len: int = 1024, output_len: int = 128,
                  range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0) -> list[SampleRequest]:
    """Lengths uniform in [L(1-r), L(1+r)]; prompt i is the ids (offset_i + i + arange(L)) over the
    non-special vocabulary, after an optional random shared prefix."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    rng = np.random.default_rng(seed)
    real_input_len = max(0, input_len - tok.num_special_tokens_to_add())
    in_lo, in_hi = math.floor(real_input_len * (1 - range_ratio)), math.ceil(real_input_len * (1 + range_ratio))
    out_lo = max(math.floor(output_len * (1 - range_ratio)), 1)
    out_hi = max(math.ceil(output_len * (1 + range_ratio)), 1)
    if prefix_len + in_lo < 1:
        raise ValueError("--random-input-len is too small for this tokenizer and range ratio")
    input_lens = rng.integers(in_lo, in_hi + 1, size=num_requests)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_requests)
    offsets = rng.integers(0, tok.vocab_size, size=num_requests)
    # The same expression as vLLM, so the same (set-ordered) id list.
    allowed = np.array(list(set(np.arange(tok.vocab_size)) - set(tok.all_special_ids)))
    prefix: list[int] = []
    if prefix_len > 0:
        prefix = allowed[rng.integers(0, len(allowed), size=prefix_len)].tolist()
        _, prefix, _ = _decode_to_target_len(tok, prefix, prefix_len, rng)
    out = []
    for i in range(num_requests):
        inner = allowed[(offsets[i] + i + np.arange(input_lens[i])) % len(allowed)].tolist()
        prompt, ids, _ = _decode_to_target_len(tok, prefix + inner, prefix_len + int(input_lens[i]), rng)
        out.append(SampleRequest(prompt, len(ids), int(output_lens[i])))
    return out


def sample_custom(tok: BenchTokenizer, path: str, num_requests: int, output_len: Optional[int] = 256,
                  skip_chat_template: bool = False, seed: int = 0, shuffle: bool = True,
                  no_oversample: bool = False) -> list[SampleRequest]:
    """JSONL with a "prompt" per line (and "output_tokens" when output_len is None or -1)."""
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    if not data or any("prompt" not in d for d in data):
        raise ValueError(f"{path}: every JSONL line must have a 'prompt'")
    random.seed(seed)
    if shuffle:
        random.shuffle(data)
    if num_requests <= 0:
        num_requests = len(data)
    out = []
    for item in data[:num_requests]:
        if output_len is None or output_len == -1:
            if "output_tokens" not in item:
                raise ValueError("without --custom-output-len, each line needs 'output_tokens'")
            n_out = int(item["output_tokens"])
        else:
            n_out = output_len
        prompt = item["prompt"]
        if not skip_chat_template:
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
        out.append(SampleRequest(prompt, len(tok.encode(prompt)), n_out))
    if len(out) < num_requests and not no_oversample:
        random.seed(seed)
        out += [replace(random.choice(out)) for _ in range(num_requests - len(out))]
    return out

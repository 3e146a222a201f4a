"""The standard benchmark workloads W1 and W2 (shared/bench/WORKLOADS.md), as token ids.

Every side of a comparison (Spruce, vLLM, HF transformers) gets the same token ids from here, so the
tokenizer is applied once, in Spruce's process. A tokenizer is any object with

    apply_chat_template(messages, add_generation_prompt=True, tokenize=False) -> str
    encode(text, add_special_tokens=False) -> list[int]

which both `spruce.tokenizer.Tokenizer` and a transformers tokenizer provide.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

# Exact, ending with one space (WORKLOADS.md).
FILLER = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
          "labore et dolore magna aliqua. Ut enim ad minim veniam. ")

W1_NUM_PROMPTS = 64
W1_MAX_TOKENS = 128
W2_MAX_TOKENS = 256
DEFAULT_MODEL = "smollm2-135m"


class ChatTokenizer(Protocol):
    def apply_chat_template(self, messages, add_generation_prompt: bool = ..., tokenize: bool = ...,
                            **kwargs) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class Workload:
    """Prompts as token ids plus the decoding settings every side must use."""
    name: str                       # "W1" | "W2"
    prompts: list[list[int]]
    max_tokens: int
    temperature: float = 0.0        # greedy
    ignore_eos: bool = True
    warmup: str = "short"           # what a runner does once before timing: "full" | "short" | "none"
    repeats: int = 3                # timed runs; report the median
    model: str = DEFAULT_MODEL
    extra: dict = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def settings(self) -> dict:
        """The JSON-able settings dict that `spruce.bench.peers.run_peer` and the runners take."""
        return {"workload": self.name, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "ignore_eos": self.ignore_eos, "warmup": self.warmup, "repeats": self.repeats,
                "model": self.model, **self.extra}

    def sampling_params(self):
        """The same settings as a `spruce.sampling_params.SamplingParams`."""
        from spruce.sampling_params import SamplingParams
        return SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos)


def w1_user_message(i: int) -> str:
    return f"Write a detailed story about topic number {i}: " + FILLER * ((i % 5) + 1)


def encode_chat(tokenizer: ChatTokenizer, user_message: str) -> list[int]:
    """Chat template with the generation prompt, then token ids without added special tokens
    (the template already has them)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(t) for t in ids]


def w1_prompts(tokenizer: ChatTokenizer, num_prompts: int = W1_NUM_PROMPTS) -> list[list[int]]:
    return [encode_chat(tokenizer, w1_user_message(i)) for i in range(num_prompts)]


def build_w1(tokenizer: ChatTokenizer, *, num_prompts: int = W1_NUM_PROMPTS,
             max_tokens: int = W1_MAX_TOKENS, repeats: int = 3, warmup: str = "short",
             model: str = DEFAULT_MODEL) -> Workload:
    """W1, offline throughput: 64 prompts, 128 output tokens each, greedy, ignore_eos.
    Smaller num_prompts / max_tokens are for smoke tests only."""
    return Workload("W1", w1_prompts(tokenizer, num_prompts), max_tokens, repeats=repeats,
                    warmup=warmup, model=model)


def build_w2(tokenizer: ChatTokenizer, *, max_tokens: int = W2_MAX_TOKENS, repeats: int = 3,
             warmup: str = "full", model: str = DEFAULT_MODEL) -> Workload:
    """W2, single-stream latency: prompt 0 of W1, 256 output tokens, greedy, ignore_eos, batch 1."""
    return Workload("W2", [encode_chat(tokenizer, w1_user_message(0))], max_tokens, repeats=repeats,
                    warmup=warmup, model=model)


def build_workload(name: str, tokenizer: ChatTokenizer, **kwargs) -> Workload:
    builders = {"W1": build_w1, "W2": build_w2}
    key = name.upper()
    if key not in builders:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(builders)}")
    return builders[key](tokenizer, **kwargs)


def load_tokenizer(model: str = DEFAULT_MODEL):
    """Spruce's own tokenizer for `model` when it is available, otherwise transformers' (from the
    GGUF file or HF directory that `resolve_model` finds). Both give the same ids for W1/W2."""
    from spruce.models.resolve import resolve_model
    resolved = resolve_model(model)
    try:
        from spruce.tokenizer import Tokenizer  # type: ignore[import-not-found]
    except ImportError:
        Tokenizer = None
    if Tokenizer is not None:
        return Tokenizer.from_resolved(resolved)
    return load_hf_tokenizer(model)


def load_hf_tokenizer(model: str = DEFAULT_MODEL):
    """transformers' tokenizer for `model` (needs transformers; from the GGUF or the HF dir)."""
    from transformers import AutoTokenizer

    from spruce.models.resolve import resolve_model
    resolved = resolve_model(model)
    if resolved.kind == "gguf":
        return AutoTokenizer.from_pretrained(str(resolved.path.parent), gguf_file=resolved.path.name)
    return AutoTokenizer.from_pretrained(str(resolved.path))


def prompt_lengths_summary(prompts: Sequence[Sequence[int]]) -> dict:
    lens = sorted(len(p) for p in prompts)
    return {"num_prompts": len(lens), "total": sum(lens), "min": lens[0], "max": lens[-1],
            "median": lens[len(lens) // 2]}

"""One configuration tree, passed whole to every component; each reads its own slice."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
          "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
          "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}


def parse_size(value: int | float | str) -> int:
    """'4GiB', '512MB', '1.5g' or a byte count -> bytes."""
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {value!r}; use e.g. '4GiB' or '512MB'")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


@dataclass
class ModelConfig:
    model: str = "smollm2-135m"
    tokenizer: Optional[str] = None
    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16
    device: str = "cpu"
    max_model_len: Optional[int] = None  # None: the model's own context length
    seed: int = 0
    revision: Optional[str] = None

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: Optional[int | str] = None  # bytes or '4GiB'; None: a default sized to the machine
    num_gpu_blocks_override: Optional[int] = None  # tests: an exact block count
    enable_prefix_caching: bool = True
    kv_prefault: bool = False  # make the whole cache resident at start-up (spruce serve: on)

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be >= 1")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"               # fcfs | priority
    long_prefill_token_threshold: int = 0  # 0: no cap on one request's prefill chunk
    max_waiting_requests: Optional[int] = None  # server overload bound (503 beyond it)

    def __post_init__(self):
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be fcfs|priority, got {self.policy!r}")


SPECINFER_EXPANSION = (1, 1, 3, 1, 1, 1, 1, 1)
SPEC_METHODS = ("ngram", "suffix", "draft_model", "early_exit", "mlp_speculator", "merged")


@dataclass
class SpeculativeConfig:
    """vLLM's --speculative-config shape, plus SpecInfer's tree options."""
    method: str = "ngram"
    model: Optional[str] = None               # draft_model / mlp_speculator: the checkpoint;
                                              # suffix: a datastore (a distill dir or its corpus.npy)
    num_speculative_tokens: int = 4           # chain length, or the tree's max depth
    prompt_lookup_min: int = 1                # ngram: shortest suffix to look up
    prompt_lookup_max: int = 4                # ngram: longest suffix to look up
    # Token tree: an expansion config <k1..kd> (SpecInfer), "specinfer" for its preset, or None: a chain.
    tree: Optional[str | list[int]] = None
    # Beam trees (draft_model / early_exit): keep the beam_width paths of highest cumulative draft
    # probability at each depth instead of a fixed expansion; max_tree_nodes caps the tree (root
    # included). Beam nodes are deterministic picks, verified as point masses: exact when sampling too.
    beam_width: Optional[int] = None
    max_tree_nodes: Optional[int] = None
    num_early_exit_layers: Optional[int] = None  # early_exit: target layers the draft runs
    methods: Optional[list[dict]] = None       # merged: the proposers whose trees are merged
    # suffix (spec/suffix.py), vLLM's names: the longest suffix matched (Spruce indexes every
    # n-gram up to it, so its default is below vLLM's 24), the draft size per matched token, the
    # least continuation frequency drafted, finished requests whose outputs are searched.
    suffix_decoding_max_tree_depth: int = 16
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    suffix_decoding_max_cached_requests: int = 1000
    # Load adaptation: no speculation in a step with more running requests than this.
    max_num_seqs_for_spec: int = 8
    # Measured adaptation (spec/gate.py): below that cap, draft only while steps with drafts emit
    # more tokens per second than steps without. False always drafts (tests, forced measurements).
    adaptive: bool = True
    # With adaptive on, each step also cuts the trees to the nodes whose estimated acceptance pays
    # for their rows, at most this many rows in the step, plain rows included (spec/budget.py).
    max_num_verify_rows: int = 16
    # With adaptive on, a model drafter drafts for a request only while it has at most this many
    # generated tokens to catch up on: a request decoded plain for long (a big batch's tail) would
    # first make the draft re-read all of them, which costs more than its drafts can win back.
    max_draft_backlog: int = 32

    def __post_init__(self):
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative method must be one of {SPEC_METHODS}, got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        if self.tree == "specinfer":
            self.tree = list(SPECINFER_EXPANSION)
        if self.tree is not None and (not isinstance(self.tree, (list, tuple))
                                      or not all(isinstance(k, int) and k >= 1 for k in self.tree)):
            raise ValueError(f"tree must be 'specinfer' or a list of positive ints, got {self.tree!r}")
        if self.method in ("draft_model", "mlp_speculator") and not self.model:
            raise ValueError(f"speculative method {self.method} needs 'model'")
        if self.method == "merged" and not self.methods:
            raise ValueError("speculative method merged needs 'methods': a list of proposer configs")
        if self.beam_width is not None and self.beam_width < 1:
            raise ValueError("beam_width must be >= 1")
        if self.max_tree_nodes is not None and self.max_tree_nodes < 2:
            raise ValueError("max_tree_nodes must be >= 2 (the root and one node)")
        if self.max_tree_nodes is not None and not self.beam_width and self.method != "suffix":
            raise ValueError("max_tree_nodes applies to beam trees (set beam_width too) and to suffix")
        if self.suffix_decoding_max_tree_depth < 1:
            raise ValueError("suffix_decoding_max_tree_depth must be >= 1")
        if self.suffix_decoding_max_spec_factor <= 0:
            raise ValueError("suffix_decoding_max_spec_factor must be > 0")
        if not 0 <= self.suffix_decoding_min_token_prob <= 1:
            raise ValueError("suffix_decoding_min_token_prob must be in [0, 1]")
        if self.suffix_decoding_max_cached_requests < 0:
            raise ValueError("suffix_decoding_max_cached_requests must be >= 0")
        if self.max_num_verify_rows < 2:
            raise ValueError("max_num_verify_rows must be >= 2 (a request's root and one draft node)")
        if self.prompt_lookup_min < 1 or self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")

    @property
    def depth(self) -> int:
        return len(self.tree) if self.tree else self.num_speculative_tokens

    @classmethod
    def parse(cls, value) -> Optional["SpeculativeConfig"]:
        """None, a dict, a SpeculativeConfig, or a JSON string (the CLI form)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            import json
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown speculative_config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**value)


@dataclass
class EngineConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative_config: Optional[SpeculativeConfig] = None
    max_logprobs: int = 20
    num_threads: Optional[int] = None  # torch intra-op threads; None: all cores

    def __post_init__(self):
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    @classmethod
    def from_kwargs(cls, model: Optional[str] = None, **kwargs: Any) -> "EngineConfig":
        """Flat vLLM-style engine args (`block_size=`, `max_num_seqs=`, ...) -> the tree.

        `scheduling_policy` is accepted as vLLM's name for `policy`. Unknown names raise."""
        if "scheduling_policy" in kwargs:
            kwargs["policy"] = kwargs.pop("scheduling_policy")
        parts: dict[type, dict[str, Any]] = {ModelConfig: {}, CacheConfig: {}, SchedulerConfig: {}}
        top: dict[str, Any] = {}
        if model is not None:
            parts[ModelConfig]["model"] = model
        for key, value in kwargs.items():
            for klass, bucket in parts.items():
                if key in {f.name for f in fields(klass)}:
                    bucket[key] = value
                    break
            else:
                if key in ("max_logprobs", "num_threads", "speculative_config"):
                    top[key] = value
                else:
                    raise TypeError(f"unknown engine argument {key!r}")
        return cls(ModelConfig(**parts[ModelConfig]), CacheConfig(**parts[CacheConfig]),
                   SchedulerConfig(**parts[SchedulerConfig]), **top)

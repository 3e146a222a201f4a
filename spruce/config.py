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


@dataclass
class EngineConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_logprobs: int = 20
    num_threads: Optional[int] = None  # torch intra-op threads; None: all cores

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
                if key in ("max_logprobs", "num_threads"):
                    top[key] = value
                else:
                    raise TypeError(f"unknown engine argument {key!r}")
        return cls(ModelConfig(**parts[ModelConfig]), CacheConfig(**parts[CacheConfig]),
                   SchedulerConfig(**parts[SchedulerConfig]), **top)

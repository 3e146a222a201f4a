"""Architecture name (HF `architectures[0]` or GGUF `general.architecture`) -> model class."""
from __future__ import annotations

from torch import nn

from spruce.models.llama import LlamaForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

# GGUF architecture -> the HF name it stands for.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS) + sorted(GGUF_ARCHITECTURES)


def get_model_class(architecture: str) -> type[nn.Module]:
    name = GGUF_ARCHITECTURES.get(architecture, architecture)
    if name not in _MODELS:
        raise ValueError(f"unsupported model architecture {architecture!r}; supported: "
                         f"{', '.join(supported_architectures())}")
    return _MODELS[name]

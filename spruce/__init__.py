"""Spruce: an LLM serving engine in Python on PyTorch."""
from spruce.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # LLM pulls in torch and the model code; keep `import spruce` cheap for the CLI and server.
    if name == "LLM":
        from spruce.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)

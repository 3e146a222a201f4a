import os

import pytest
import torch

# Two threads whatever the machine: results do not depend on it, and CI has 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M loaded once (float32) for every engine the tests build."""
    from spruce.config import EngineConfig
    from spruce.engine.core import load
    return load(EngineConfig.from_kwargs(model="smollm2-135m", dtype="float32"))


@pytest.fixture(scope="session")
def make_llm(smollm):
    from spruce.entrypoints.llm import LLM

    def make(**engine_args):
        engine_args.setdefault("kv_cache_memory", "256MiB")
        spec = engine_args.get("speculative_config")
        if isinstance(spec, dict) and "adaptive" not in spec:
            # Speculation tests check every drafted step; the timing-driven gate would make
            # which steps draft vary from run to run (tests/spec/test_gate.py covers the gate).
            engine_args["speculative_config"] = {**spec, "adaptive": False}
        return LLM("smollm2-135m", _loaded=smollm, dtype="float32", **engine_args)
    return make


@pytest.fixture(scope="session")
def ops():
    """The native CPU ops (spruce/csrc). Where a C++ compiler exists (CI has one) they must build:
    their tests fail rather than skip when they do not, so a broken build cannot pass as skipped."""
    from spruce.attention import _build
    if _build._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    mod = _build.load_native_ops()
    assert mod is not None, f"native ops failed to build: {_build.load_error()}"
    return mod

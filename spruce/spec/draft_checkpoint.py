"""What a draft checkpoint directory holds beyond weights, and the checks it must pass.

`spruce distill` writes both kinds of draft (a small causal LM, or an MLP speculator) with a
`spruce_draft` section in config.json (what it was trained for), for a reduced head,
draft_vocab.json (the token ids its head covers: FR-Spec), and corpus.npy: the text the target
generated for it, which the suffix proposer (spec/suffix.py) can search as a datastore.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

DRAFT_CONFIG_KEY = "spruce_draft"
DRAFT_VOCAB_FILE = "draft_vocab.json"
CORPUS_FILE = "corpus.npy"
# Prompt tokens kept before each answer: the chat template's tail ("<|im_start|>assistant\n"),
# so the datastore also knows how the target's answers open.
CORPUS_PROMPT_TAIL = 3


def save_draft_vocab(out: Path, draft_vocab: Optional[Sequence[int]]) -> None:
    """Write the reduced head's token ids, or remove a stale file for a full head."""
    vocab_file = out / DRAFT_VOCAB_FILE
    if draft_vocab is not None:
        vocab_file.write_text(json.dumps({"token_ids": [int(t) for t in draft_vocab]}))
    elif vocab_file.exists():
        vocab_file.unlink()


def save_corpus(out: Path, sequences: Sequence[Sequence[int]]) -> Path:
    """The target's generated token sequences as one int32 array, each followed by -1."""
    import numpy as np
    out.mkdir(parents=True, exist_ok=True)
    flat = [t for seq in sequences for t in (*seq, -1)]
    path = out / CORPUS_FILE
    np.save(path, np.asarray(flat, dtype=np.int32))
    return path


def load_corpus(path) -> "np.ndarray":
    """A corpus.npy (or a draft directory holding one): int32 tokens, -1 between sequences."""
    import numpy as np
    p = Path(path)
    if p.is_dir():
        p = p / CORPUS_FILE
    if not p.is_file():
        raise ValueError(f"no datastore corpus at {p} (spruce distill writes {CORPUS_FILE} into its --out)")
    arr = np.load(p)
    if arr.dtype != np.int32 or arr.ndim != 1:
        raise ValueError(f"{p}: expected a 1-D int32 array, got {arr.dtype} of shape {arr.shape}")
    return arr


def load_draft_vocab(path: Path) -> Optional[list[int]]:
    """The reduced head's token ids (spruce distill --draft-vocab), or None for a full head."""
    f = path / DRAFT_VOCAB_FILE
    if not f.is_file():
        return None
    ids = json.loads(f.read_text())["token_ids"]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"{f}: token_ids must be a non-empty list of distinct ids")
    return [int(i) for i in ids]


def _draft_tokenizer(resolved):
    from spruce.models.resolve import resolve_model
    from spruce.tokenizer import Tokenizer
    if resolved.kind == "hf_dir":
        path = Path(resolved.path)
        if not (path / "tokenizer.json").is_file():
            cfg = json.loads((path / "config.json").read_text()).get(DRAFT_CONFIG_KEY) or {}
            if cfg.get("target"):
                return Tokenizer.from_resolved(resolve_model(cfg["target"]))
            raise ValueError(f"draft model {path} has no tokenizer.json and no "
                             f"'{DRAFT_CONFIG_KEY}.target' in its config.json to take one from")
    return Tokenizer.from_resolved(resolved)


def check_draft_vocab(resolved, draft_config, target) -> None:
    """The draft must speak the target's token ids: same embedding rows, same vocabulary."""
    if draft_config.vocab_size != target.vocab_size:
        raise ValueError(f"draft model {resolved.name!r} has vocab_size {draft_config.vocab_size}, "
                         f"the target has {target.vocab_size}: they must share a tokenizer")
    check_same_vocab(f"draft model {resolved.name!r}",
                     _draft_tokenizer(resolved).backend.get_vocab(with_added_tokens=True), target)


def check_same_vocab(what: str, vocab: dict[str, int], target) -> None:
    """`vocab` (token -> id) must be the target's exactly."""
    b = target.tokenizer.backend.get_vocab(with_added_tokens=True)
    if vocab != b:
        diff = sum(1 for k, v in vocab.items() if b.get(k) != v) + abs(len(vocab) - len(b))
        raise ValueError(f"{what} has a different tokenizer than the target "
                         f"(~{diff} vocabulary entries differ)")

"""MLP speculator: drafting from the target's own last hidden state.

A separate draft model sees only tokens; its agreement with SmolLM2-135M stayed at 38% after a
30-minute distillation here. The target's final hidden state at the token before the root already
encodes most of what comes next (EAGLE's observation), so this head drafts from it:

    s_1     = f(h_p, embed(x_{p+1}))          h_p: the target's final-normed hidden that gave x_{p+1}
    s_{d+1} = f(s_d, embed(x_{p+d+1}))        each s_d lives in the target's final-normed space,
    q_d     = softmax(s_d · W_head[vocab])    so the target's own head (rows of `vocab`) reads it

f is one residual SwiGLU block over [norm(state) ; norm(embed)] -- EAGLE's feature-level
drafting with an MLP in place of its decoder layer, so the head keeps no KV cache: there is
nothing to catch up on after plain steps, and a request drafts from the hidden state the
target's last step returned (ModelRunnerOutput.hidden). vLLM's method name for this family
(IBM's MLPSpeculator) is `mlp_speculator`. The embeddings and head are the target's, so a
checkpoint (written by `spruce distill --kind mlp_speculator`) holds only f, the reduced
vocabulary and the target's tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spruce.config import SpeculativeConfig
from spruce.models.quant import read_as_q8_0, select_rows
from spruce.request import Request
from spruce.spec.draft_trees import build_draft_trees, draft_generator, reduced_head_logits
from spruce.spec.proposers import Proposer

SPECULATOR_KIND = "mlp_speculator"


class SpeculatorHead(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-5,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        h, i = hidden_size, intermediate_size
        self.hidden_size, self.intermediate_size, self.eps = h, i, eps
        self.state_norm = nn.Parameter(torch.ones(h, dtype=dtype))
        self.token_norm = nn.Parameter(torch.ones(h, dtype=dtype))
        self.fc_in = nn.Parameter(torch.zeros(h, 2 * h, dtype=dtype))
        self.ffn_norm = nn.Parameter(torch.ones(h, dtype=dtype))
        self.gate_up = nn.Parameter(torch.zeros(2 * i, h, dtype=dtype))
        self.down = nn.Parameter(torch.zeros(h, i, dtype=dtype))
        self.out_norm = nn.Parameter(torch.ones(h, dtype=dtype))

    def init_(self, out_norm: torch.Tensor, seed: int = 0) -> "SpeculatorHead":
        """Start as 'the next state is the current one' (fc_in passes the state through, the
        SwiGLU adds nothing), in the target's final-norm scale."""
        g = torch.Generator().manual_seed(seed)
        h = self.hidden_size
        with torch.no_grad():
            self.fc_in.zero_()
            self.fc_in[:, :h].copy_(torch.eye(h))
            self.fc_in[:, h:].copy_(torch.randn(h, h, generator=g) * (0.02 / h ** 0.5))
            self.gate_up.copy_(torch.randn(self.gate_up.shape, generator=g) * h ** -0.5)
            self.down.zero_()
            self.out_norm.copy_(out_norm.float())
        return self

    def forward(self, state: torch.Tensor, token_emb: torch.Tensor, linear=F.linear) -> torch.Tensor:
        """`linear`: F.linear (training), or the target's (models/linear.py: AMX / packed GEMMs)."""
        x = torch.cat((self._norm(state, self.state_norm), self._norm(token_emb, self.token_norm)), -1)
        x = linear(x, self.fc_in)
        gate, up = linear(self._norm(x, self.ffn_norm), self.gate_up).chunk(2, -1)
        x = x + linear((F.silu(gate) * up).contiguous(), self.down)
        return self._norm(x, self.out_norm)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # In x's dtype: under training's bf16 autocast x is bf16 and the weights fp32.
        return F.rms_norm(x, (self.hidden_size,), weight.to(x.dtype), self.eps)


# ----- checkpoint -------------------------------------------------------------------------------

def save_speculator(head: SpeculatorHead, out_dir, tokenizer, target_name: str, vocab_size: int,
                    draft_vocab: Optional[Sequence[int]], info: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    from spruce.spec.draft_checkpoint import DRAFT_CONFIG_KEY, save_draft_vocab
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["SpruceMLPSpeculator"], "hidden_size": head.hidden_size,
           "intermediate_size": head.intermediate_size, "rms_norm_eps": head.eps, "vocab_size": vocab_size,
           DRAFT_CONFIG_KEY: {"kind": SPECULATOR_KIND, "target": target_name, **(info or {})}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.detach().float().contiguous() for k, v in head.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    save_draft_vocab(out, draft_vocab)
    tokenizer.backend.save(str(out / "tokenizer.json"))
    return out


def is_speculator_dir(path) -> bool:
    from spruce.spec.draft_checkpoint import DRAFT_CONFIG_KEY
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    return json.loads(cfg.read_text()).get(DRAFT_CONFIG_KEY, {}).get("kind") == SPECULATOR_KIND


def load_speculator(path, target) -> tuple[SpeculatorHead, Optional[list[int]]]:
    """The head (in the target's dtype) and its reduced vocabulary; checks it fits `target`."""
    from safetensors.torch import load_file

    from spruce.spec.draft_checkpoint import check_same_vocab, load_draft_vocab
    d = Path(path)
    if not is_speculator_dir(d):
        raise ValueError(f"{d} is not an MLP speculator checkpoint (spruce distill --kind {SPECULATOR_KIND})")
    cfg = json.loads((d / "config.json").read_text())
    mc = target.model_config
    if cfg["hidden_size"] != mc.hidden_size or cfg["vocab_size"] != target.vocab_size:
        raise ValueError(f"speculator {d} was trained for hidden_size {cfg['hidden_size']} / vocab_size "
                         f"{cfg['vocab_size']}; the target has {mc.hidden_size} / {target.vocab_size}")
    from tokenizers import Tokenizer
    check_same_vocab(f"speculator {str(d)!r}",
                     Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True), target)
    head = SpeculatorHead(cfg["hidden_size"], cfg["intermediate_size"], cfg.get("rms_norm_eps", 1e-5))
    head.load_state_dict(load_file(str(d / "model.safetensors")))
    head.requires_grad_(False)
    return head.to(dtype=target.dtype, device=target.device).eval(), load_draft_vocab(d)


# ----- proposer ---------------------------------------------------------------------------------

class MLPSpeculatorProposer(Proposer):
    """Trees from the speculator head on the hidden state of each request's last target step."""
    needs_hidden = True

    def __init__(self, config: SpeculativeConfig, target, proposer_id: int = 0):
        self.proposer_id = proposer_id
        self.device = target.device
        self.vocab_size = target.vocab_size
        self.expansion = list(config.tree) if config.tree else [1] * config.num_speculative_tokens
        self.beam_width, self.max_tree_nodes = config.beam_width, config.max_tree_nodes
        self.depth = len(self.expansion)
        self.head, vocab = load_speculator(config.model, target)
        model = target.model
        self.linear = model.linear
        self.embed = model.embed_tokens
        w = model.embed_tokens if model.lm_head is None else model.lm_head
        self.head_ids = None if vocab is None else torch.tensor(vocab, dtype=torch.long, device=self.device)
        self.head_weight = w if self.head_ids is None else select_rows(self.linear, w, self.head_ids)
        # In an fp32 target that reads its weights as blocks (the GGUF's Q4_1/Q8_0, ~80 MB a
        # token for SmolLM2), the head's fp32 block and reduced head would be 32 MB a drafting
        # step; as Q8_0 blocks they are 8.5.
        read_as_q8_0(self.linear, [self.head.fc_in, self.head.gate_up, self.head.down])
        # request id -> (the request's num_tokens when it was stored, final-normed hidden [H]).
        self.hidden: dict[str, tuple[int, torch.Tensor]] = {}
        # Seeded sampled requests draw their drafts from a stream of their own, kept across steps.
        self.generators: dict[str, tuple[Request, Optional[torch.Generator]]] = {}

    def observe_hidden(self, requests: Sequence[Request], hidden: dict[str, torch.Tensor]) -> None:
        for r in requests:
            h = hidden.get(r.request_id)
            if h is not None:
                self.hidden[r.request_id] = (r.num_tokens, h)

    def on_finished(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self.hidden.pop(rid, None)
            self.generators.pop(rid, None)

    def _generator(self, req: Request) -> Optional[torch.Generator]:
        got = self.generators.get(req.request_id)
        if got is None or got[0] is not req:
            got = self.generators[req.request_id] = (req, draft_generator(req))
        return got[1]

    @torch.inference_mode()
    def propose(self, requests: Sequence[Request], min_prob: float = 0.0) -> list:
        out: list = [None] * len(requests)
        # Only a hidden state from the step that produced the root is the right one.
        ready = [i for i, r in enumerate(requests)
                 if self.hidden.get(r.request_id, (-1, None))[0] == r.num_tokens]
        if not ready:
            return out
        reqs = [requests[i] for i in ready]
        roots_h = torch.stack([self.hidden[r.request_id][1] for r in reqs])

        def make_step_fn(group: list[int], temps: list[float]):
            temp_t = torch.tensor(temps, dtype=torch.float32, device=self.device)[:, None]
            states: dict[tuple, torch.Tensor] = {}

            def step(contexts: list[list[int]]) -> torch.Tensor:
                js = [-c[0] - 1 for c in contexts]
                parents = torch.stack([roots_h[group[j]] if len(c) == 2 else states[(j, tuple(c[2:-1]))]
                                       for j, c in zip(js, contexts)])
                tokens = torch.tensor([c[-1] for c in contexts], dtype=torch.long, device=self.device)
                new = self.head(parents, F.embedding(tokens, self.embed), self.linear)
                for k, (j, c) in enumerate(zip(js, contexts)):
                    states[(j, tuple(c[2:]))] = new[k]
                return (self._logits(new) / temp_t[js]).softmax(-1)
            return step

        trees = build_draft_trees(reqs, make_step_fn, self.expansion, self.beam_width, self.depth,
                                  self.max_tree_nodes, self.proposer_id, [self._generator(r) for r in reqs],
                                  min_prob)
        for i, t in zip(ready, trees):
            out[i] = t
        return out

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        if self.head_ids is None:
            return self.linear(states, self.head_weight).float()
        return reduced_head_logits(self.linear, states, self.head_weight, self.head_ids, self.vocab_size)

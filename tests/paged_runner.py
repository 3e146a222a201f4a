"""A test driver for the model over a real paged KV cache, without the engine."""
import torch

from spruce.attention.metadata import AttentionMetadata
from spruce.models.llama import allocate_kv_cache

BS = 4


class PagedRunner:
    """Drives the model like the engine does: flat batches, a block table per request."""

    def __init__(self, model, config, num_blocks=64, seed=0):
        self.model = model
        self.kv = allocate_kv_cache(config, num_blocks, BS, model.dtype, "cpu")
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.blocks: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """chunks: request -> new token ids. Returns request -> logits for those tokens."""
        ids, pos, slots, qsl, seq_lens, qlens, tables = [], [], [], [0], [], [], []
        for rid, toks in chunks.items():
            start = self.lens.get(rid, 0)
            end = start + len(toks)
            bl = self.blocks.setdefault(rid, [])
            while len(bl) * BS < end:
                bl.append(self.free.pop())
            ids += toks
            pos += range(start, end)
            slots += [bl[p // BS] * BS + p % BS for p in range(start, end)]
            qsl.append(qsl[-1] + len(toks))
            seq_lens.append(end)
            qlens.append(len(toks))
            tables.append(bl)
            self.lens[rid] = end
        width = max(len(t) for t in tables)
        md = AttentionMetadata(
            num_tokens=len(ids), query_start_loc=qsl, seq_lens=seq_lens, query_lens=qlens,
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            slot_mapping=torch.tensor(slots), block_size=BS, seq_lens_t=torch.tensor(seq_lens))
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.kv, md)
            logits = self.model.compute_logits(hidden)
        return {rid: logits[qsl[i]:qsl[i + 1]] for i, rid in enumerate(chunks)}

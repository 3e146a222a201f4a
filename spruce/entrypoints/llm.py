"""The offline Python API: `LLM(model=...).generate(prompts, params)` and `LLM.chat(messages)`."""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Union

from tqdm import tqdm

from spruce.config import EngineConfig
from spruce.engine.core import EngineCore, PromptType
from spruce.outputs import RequestOutput
from spruce.sampling_params import SamplingParams

Messages = list[dict]


class LLM:
    """vLLM-style offline engine. Engine arguments are vLLM's names: `dtype`, `block_size`,
    `kv_cache_memory`, `max_num_batched_tokens`, `max_num_seqs`, `enable_prefix_caching`,
    `enable_chunked_prefill`, `max_model_len`, `scheduling_policy`, `seed`, `device`, ..."""

    def __init__(self, model: str = "smollm2-135m", _loaded=None, **engine_args):
        self.config = EngineConfig.from_kwargs(model=model, **engine_args)
        self.engine = EngineCore(self.config, loaded=_loaded)
        self.tokenizer = self.engine.tokenizer

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = True, priority: Optional[list[int]] = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}. Invalid prompts or
        parameters raise ValueError before anything runs."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)) \
                or isinstance(prompts, dict):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                ids.append(self.engine.add_request(prompt, p.clone(), priority=priority[i] if priority else 0))
        except Exception:
            self.engine.abort_request(ids)  # all or nothing: a bad prompt queues none of the batch
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Union[Messages, Sequence[Messages]], sampling_params: Optional[SamplingParams] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt), add_special_tokens=False) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", file=sys.stderr,
                   disable=not use_tqdm or len(ids) < 2)
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]

"""Tokenizer, incremental detokenizer and stop-string checks.

Runtime uses only the `tokenizers` library: importing transformers costs seconds, so it is only a
fallback for GGUF vocabularies other than byte-level BPE (sentencepiece, ...), run once per file and
cached as a tokenizer.json under $SPRUCE_CACHE_DIR (default ~/.cache/spruce).
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, Regex, AddedToken

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
# llama.cpp ends generation on these when they are control tokens, whatever the eos id says; GGUF files
# carry no generation_config, so without this an instruct model could run past its end-of-turn marker.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                "<|end_of_text|>", "<EOT>", "<|end▁of▁sentence|>", "<|return|>", "<|call|>")

# ---------------------------------------------------------------- GGUF metadata

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path) -> tuple[dict, str]:
    """All key/values of a GGUF file (no tensors), and a digest of their bytes for cache keys.

    Hand-rolled rather than gguf.GGUFReader: that one also maps every tensor and parses each of the
    ~100k vocabulary strings as a separate numpy field, which is several times slower.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version = struct.unpack_from("<4sI", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_kv = struct.unpack_from("<Q", buf, 16)[0]
        unpack, off = struct.unpack_from, 24

        def value(kind, off):
            if kind in _SCALAR:
                fmt = "<" + _SCALAR[kind]
                return unpack(fmt, buf, off)[0], off + struct.calcsize(fmt)
            if kind == 8:
                n = unpack("<Q", buf, off)[0]
                return str(buf[off + 8:off + 8 + n], "utf-8", "replace"), off + 8 + n
            elem, n = unpack("<IQ", buf, off)  # kind 9: array
            off += 12
            if elem in _SCALAR:  # one unpack for the whole array: token types, scores
                fmt = f"<{n}{_SCALAR[elem]}"
                return list(unpack(fmt, buf, off)), off + struct.calcsize(fmt)
            out = []
            for _ in range(n):
                if elem == 8:  # vocabulary and merges: ~100k strings, so skip the call overhead
                    m = unpack("<Q", buf, off)[0]
                    out.append(str(buf[off + 8:off + 8 + m], "utf-8", "replace"))
                    off += 8 + m
                else:
                    v, off = value(elem, off)
                    out.append(v)
            return out, off

        meta = {}
        for _ in range(n_kv):
            key, off = value(8, off)
            meta[key], off = value(unpack("<I", buf, off)[0], off + 4)
        digest = hashlib.sha256(buf[:off]).hexdigest()[:32]
    return meta, digest


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable spelling of each byte, which byte-level BPE vocabularies are written in.
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (regexes applied in turn, as llama.cpp's llama-vocab.cpp does). The smollm family
# isolates every digit first, as its original tokenizer.json does (Digits(individual_digits=True)).
# transformers' GGUF converter skips that step, so it differs from us on e.g. "  12" (whitespace run
# before a digit); we follow llama.cpp and the upstream tokenizer, which the model was trained with.
_PRE_SPLITS = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"), (_GPT2_SPLIT,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), (_QWEN2_SPLIT,)),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), (_GPT4O_SPLIT,)),
}


def _byte_level_from_gguf(meta: dict) -> _HFTokenizer:
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    pre = meta.get("tokenizer.ggml.pre", "default")
    splits = _PRE_SPLITS.get(pre)
    if splits is None:
        logger.warning("GGUF pre-tokenizer %r is unknown to spruce; using GPT-2's split rules", pre)
        splits = _PRE_SPLITS["default"]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A few converters store tokens as raw text; the BPE model needs them in the byte alphabet.
    if set("".join(tokens)) <= alphabet:  # the usual case; checking each token costs 0.1 s
        vocab = dict(zip(tokens, range(len(tokens))))
    else:
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
                 for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # 3 = control (special, e.g. <|im_end|>), 4 = user-defined (matched whole, not special). A "control"
    # token outside the byte alphabet is a llama.cpp mislabel; transformers skips those and so do we.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == 4 and t in vocab])
    return tok


def _cached_transformers_conversion(key: str, load) -> _HFTokenizer:
    """Build with transformers once (slow), then reuse its tokenizer.json from disk."""
    cache = Path(os.environ.get("SPRUCE_CACHE_DIR", Path.home() / ".cache" / "spruce")) / "tokenizers"
    file = cache / f"{key}.json"
    if file.is_file():
        return _HFTokenizer.from_file(str(file))
    logger.info("converting tokenizer with transformers (one time); caching at %s", file)
    tok = load().backend_tokenizer
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, file)  # atomic, so a concurrent reader never sees half a file
    return tok


def _content(tok):  # tokenizer_config writes special tokens as "str" or {"content": "str", ...}
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

# ---------------------------------------------------------------- Tokenizer


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, *, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                 add_bos_token=None, add_eos_token=None, chat_template=None, extra_eos_ids=()):
        self._tok = backend
        self.special_tokens_map = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                                      ("unk_token", unk_token), ("pad_token", pad_token)) if v}
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token else None
        self.chat_template = chat_template
        self._compiled_template = None
        # GGUF flags rebuild the post-processor. For HF dirs the tokenizer.json's own one stands and
        # tokenizer_config's add_bos_token is ignored, as transformers 5 does when tokenizer.json exists.
        if add_bos_token is not None or add_eos_token is not None:
            pre = [bos_token] if add_bos_token and self.bos_token_id is not None else []
            post = [eos_token] if add_eos_token and self.eos_token_id is not None else []
            backend.post_processor = processors.TemplateProcessing(
                single=pre + ["$A"] + post, pair=pre + ["$A"] + post + pre + ["$B:1"] + post,
                special_tokens=[(t, backend.token_to_id(t)) for t in {*pre, *post}])
        special_ids = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_token_ids = set(special_ids.values())
        stops = {self.eos_token_id, *extra_eos_ids} | {special_ids[t] for t in _END_OF_TURN if t in special_ids}
        self.stop_token_ids: set[int] = {i for i in stops if i is not None}

    @classmethod
    def from_resolved(cls, resolved) -> "Tokenizer":
        if resolved.kind == "gguf":
            return cls.from_gguf(resolved.path)
        if resolved.kind == "hf_dir":
            return cls.from_hf_dir(resolved.path)
        raise ValueError(f"unknown model kind {resolved.kind!r}")

    @classmethod
    def from_gguf(cls, path, _use_transformers: bool = False) -> "Tokenizer":
        path = Path(path)
        meta, digest = read_gguf_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
        if kind == "gpt2" and not _use_transformers:
            backend = _byte_level_from_gguf(meta)
        else:  # sentencepiece ('llama'), unigram ('t5'), ...: rare enough to borrow transformers' converter
            def load():
                try:
                    from transformers import AutoTokenizer
                except ImportError as e:
                    raise ValueError(f"{path}: GGUF tokenizer type {kind!r} needs transformers installed "
                                     "for its one-time conversion (pip install transformers)") from e
                return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            backend = _cached_transformers_conversion(f"gguf-{digest}", load)
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None
        # llama.cpp adds BOS for sentencepiece vocabularies that do not say otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        return cls(backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                   unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
                   add_bos_token=add_bos, add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        cfg = _read_json(path / "tokenizer_config.json")
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json; sentencepiece-only (tokenizer.model) "
                                    "directories are not supported: save the tokenizer with transformers first")
        backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it on its own, and prefers it
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        eos_ids = _read_json(path / "generation_config.json").get("eos_token_id")
        if eos_ids is None:
            eos_ids = _read_json(path / "config.json").get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        eos_token = _content(cfg.get("eos_token"))
        if eos_token is None and eos_ids:
            eos_token = backend.id_to_token(eos_ids[0])
        return cls(backend, bos_token=_content(cfg.get("bos_token")), eos_token=eos_token,
                   unk_token=_content(cfg.get("unk_token")), pad_token=_content(cfg.get("pad_token")),
                   chat_template=template, extra_eos_ids=eos_ids)

    # -- basic API
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, ids) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    # -- chat
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False,
                            tools=None, documents=None, **template_kwargs):
        if not self.chat_template:
            raise ValueError("this model has no chat template; use the completions API or pass a template")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        text = self._compiled_template.render(
            messages=validate_messages(messages), tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **template_kwargs})
        # The template already wrote any BOS it wants, as transformers assumes too.
        return self.encode(text, add_special_tokens=False) if tokenize else text


def validate_messages(messages) -> list[dict]:
    """Check OpenAI-style messages; return copies with list contents joined into one string.

    Joined with "\\n" (as vLLM does for templates that expect string content) so any template works.
    Keys whose value is None are dropped, as transformers does, so templates see them as undefined.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        m = {k: v for k, v in m.items() if v is not None}
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': str}}; "
                                     f"got {part!r:.80}")
                texts.append(part["text"])
            m["content"] = "\n".join(texts)
        elif content is None:
            if not (role == "assistant" and m.get("tool_calls")):
                raise ValueError(f"messages[{i}] ({role}) has no content")
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts; "
                             f"got {type(content).__name__}")
        out.append(m)
    return out


def _compile_template(source: str):
    # Mirrors transformers' environment so rendered prompts match byte for byte.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # {% generation %} marks assistant spans for training masks; for serving, render the body as is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)

# ---------------------------------------------------------------- streaming detokenization


class IncrementalDetokenizer:
    """Turns token ids into text deltas, one step at a time (vLLM/TGI prefix/read offset scheme).

    Each step decodes only ids[prefix_offset:] (a few tokens) twice and emits the difference, so
    tokenizers that merge/strip across token boundaries (sentencepiece spaces, byte-level multi-byte
    chars) still come out right. Text ending in U+FFFD is an unfinished UTF-8 sequence: held back until
    a later token completes it.
    """
    _CONTEXT = 5      # prompt tokens decoded as left context
    _TRIM_AT = 1024   # drop consumed ids past this many, so memory stays bounded too

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_token_ids[-self._CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.output_text = ""

    def update(self, new_token_ids) -> str:
        self._ids.extend(new_token_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """Text still held back (an unfinished character) when generation ends; may contain U+FFFD."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        window = self._ids[self._prefix_offset:]
        prefix_text = self._tok.decode(window[:self._read_offset - self._prefix_offset], self._skip)
        new_text = self._tok.decode(window, self._skip)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > self._TRIM_AT:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self.output_text += delta
        return delta

# ---------------------------------------------------------------- stop strings


def check_stop_strings(output_text: str, new_text_len: int, stop, include_stop_str_in_output: bool = False):
    """Find a stop string that ends inside the last `new_text_len` chars of `output_text`.

    Returns (truncate_to, matched_stop): output_text[:truncate_to] is what to keep, or (None, None).
    Only matches ending in the new text are looked for (earlier ones were caught on earlier calls),
    which also covers stop strings straddling old and new text. Among several, the one that completes
    first wins (what character-by-character streaming would see), then the one starting first.
    """
    best = None
    start_of_new = len(output_text) - new_text_len
    for s in stop:
        if not s:
            continue
        i = output_text.find(s, max(0, start_of_new - len(s) + 1))
        if i != -1 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    if best is None:
        return None, None
    i, s = best
    return (i + len(s) if include_stop_str_in_output else i), s


def withheld_len(text: str, stop) -> int:
    """How many trailing chars of `text` could be the start of a stop string (hold them back when streaming)."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class StopChecker:
    """Per-sequence stop-string state for streaming: feed text deltas, get back what is safe to send.

    After a match, `matched_stop` is set, `text` is the final (truncated) output and further
    appends return "". Call `flush()` when the sequence ends for another reason to release the
    withheld tail.
    """

    def __init__(self, stop, include_stop_str_in_output: bool = False):
        self.stop = [s for s in (stop or []) if s]
        self.include = include_stop_str_in_output
        self.text = ""
        self.matched_stop: str | None = None
        self._sent = 0  # chars of self.text already returned to the caller

    def append(self, delta: str) -> str:
        if self.matched_stop is not None or not delta:
            return ""
        self.text += delta
        if self.stop:
            cut, s = check_stop_strings(self.text, len(delta), self.stop, self.include)
            if s is not None:
                self.text, self.matched_stop = self.text[:cut], s
                return self._release(len(self.text))
            tail = self.text[-max(map(len, self.stop)):]
            return self._release(len(self.text) - withheld_len(tail, self.stop))
        return self._release(len(self.text))

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self._sent:upto] if upto > self._sent else ""
        self._sent = max(self._sent, upto)
        return out

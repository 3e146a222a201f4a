"""`spruce serve | generate | chat | bench`."""
from __future__ import annotations

import argparse
import sys

from spruce.entrypoints.args import add_engine_args, add_sampling_args, engine_kwargs, sampling_params


def _generate(args) -> int:
    from spruce.entrypoints.llm import LLM
    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.chat:
        outs = [llm.chat([{"role": "user", "content": p}], params, use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, params)
    for out in outs:
        for c in out.outputs:
            print(c.text if not args.show_meta else
                  f"--- [{out.request_id}.{c.index}] finish={c.finish_reason} tokens={len(c.token_ids)}\n{c.text}")
    return 0


def _chat(args) -> int:
    from spruce.entrypoints.llm import LLM
    llm = LLM(**engine_kwargs(args))
    engine, tok = llm.engine, llm.tokenizer
    params = sampling_params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting with the model. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        rid = engine.add_request(ids, params.clone())
        reply, done = "", False
        while not done:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                delta = out.deltas.get(0, ("", []))[0]
                reply += delta
                print(delta, end="", flush=True)
                done = out.finished
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def _serve(args) -> int:
    from spruce.server.serve import serve
    return serve(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="spruce", description="Spruce LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (vLLM's flags and metrics)")
    from spruce.server.serve import add_serve_args
    add_serve_args(s)
    s.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="generate completions for prompts (arguments or stdin lines)")
    add_engine_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable); default: read stdin")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--show-meta", action="store_true")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="interactive chat, streamed to the terminal")
    add_engine_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=_chat)

    b = sub.add_parser("bench", help="benchmarks: throughput (W1), latency (W2), serve (W3)")
    from spruce.bench.cli import add_bench_subcommands
    add_bench_subcommands(b)

    d = sub.add_parser("distill", help="train a small draft model for speculative decoding")
    from spruce.spec.distill import add_distill_args
    add_distill_args(d)

    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"spruce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

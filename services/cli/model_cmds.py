"""``internlm convert`` and ``internlm generate`` (local model, or the running stack's endpoint)."""
from __future__ import annotations

import json
import sys

from internlm_core.batching import SPECULATION, Batcher, BatcherMetrics
from internlm_core.draft import check_draft_model
from internlm_core.config import DTYPES
from internlm_core.memory import CACHE_DTYPES
from internlm_core.quantize import METHODS
from services.cli.remote import add_endpoint_arguments


def register(sub) -> None:
    p = sub.add_parser("convert", help="HF InternLM folder -> MindSpore model folder (or back with --to-hf)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=DTYPES, help="target dtype (default: the source's)")
    p.add_argument("--to-hf", action="store_true", help="MindSpore model folder -> HF safetensors folder")
    p.add_argument("--quantize", choices=METHODS, help="store the linears' weights quantised: int8 (per-channel scales) or int4 "
                                                        "(a scale per 32 inputs)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=convert)

    g = sub.add_parser("generate", help="generate from a local model folder, or from the running stack")
    g.add_argument("prompt", nargs="?", help="text (bos is added); see --chat and --ids")
    g.add_argument("--model", help="local model folder; without it, ask the running stack's endpoint")
    add_endpoint_arguments(g)
    g.add_argument("--ids", help="comma-separated token ids, fed as they are")
    g.add_argument("--chat", action="store_true", help="render the prompt as a user turn in InternLM's chat format")
    g.add_argument("--system", help="system prompt (with --chat)")
    g.add_argument("--thinking", action="store_true",
                   help="with --chat: InternLM3's thinking mode (its published thinking system prompt goes first)")
    g.add_argument("--allow-special-tokens", action="store_true",
                   help="literal <s>, </s>, <eoh>, <eoa>, ... in the prompt become control tokens "
                        "(default: plain text)")
    add_sampling_flags(g)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_grammar_flags(g)
    g.add_argument("--adapter", help="LoRA adapter name (remote only)")
    g.add_argument("--quantize", choices=METHODS,
                   help="with --model: quantise a float model's linears (int8 or int4) while loading (local only)")
    g.add_argument("--kv-cache-dtype", choices=CACHE_DTYPES,
                   help="the KV cache's dtype with --model (default: float16 on the CPU kernels, float32 otherwise)")
    g.add_argument("--speculate", choices=("auto", *SPECULATION),
                   help="with --model: speculative decoding, as the worker's option (default: off, or auto with "
                        "--draft-model; auto: draft with --draft-model, else ngram where the CPU kernels serve); "
                        "without --model only 'off', which opts this request out of the stack's")
    g.add_argument("--draft-model", metavar="DIR",
                   help="with --model: a smaller model folder with the same tokenizer whose tokens are verified as "
                        "proposals (--speculate draft or auto)")
    g.add_argument("--json", action="store_true", help="print one JSON object at the end (with --speculate: "
                                                        "the proposals made and kept)")
    g.set_defaults(func=generate)


def convert(args) -> int:
    from tqdm import tqdm

    from internlm_core.convert import hf_to_ms, ms_to_hf

    bar = tqdm(total=0, unit="B", unit_scale=True, desc="convert", file=sys.stderr)

    def progress(done, total, name):
        bar.total = total
        bar.n = done
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.refresh()

    if args.to_hf and args.quantize:
        raise ValueError("--quantize applies to HF -> MindSpore conversion, not --to-hf")
    try:
        if args.to_hf:
            cfg = ms_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=progress)
        else:
            cfg = hf_to_ms(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=progress,
                           quantize=args.quantize)
    finally:
        bar.close()  # an error then starts on its own line, not after the bar
    print(f"wrote {args.dst} ({cfg.num_parameters() / 1e6:.1f}M parameters, {cfg.dtype}"
          f"{', linears ' + cfg.quantization if cfg.quantization else ''})")
    return 0


def add_sampling_flags(parser) -> None:
    """One flag per number-valued ``SamplingParams`` field, with its help; unset flags keep the
    core's defaults (locally) or the server's (remotely)."""
    import dataclasses

    from internlm_core.generation import SCALAR_PARAMS, SamplingParams

    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    for name in SCALAR_PARAMS:
        f = fields[name]
        default = f.default if f.default is not None else "none"
        parser.add_argument("--" + name.replace("_", "-"), type=float if f.type == "float" else int,
                            help=f"{f.metadata['help']} (default: {default})")


def add_grammar_flags(parser) -> None:
    """Structured output: at most one grammar the answer must match (``SamplingParams.grammar``)."""
    x = parser.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="SCHEMA", help="the answer is JSON valid against this JSON Schema "
                                                           "(JSON text, or @FILE)")
    x.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    x.add_argument("--regex", help="the whole answer matches this regular expression")
    x.add_argument("--choice", action="append", help="the answer is one of these strings (repeatable)")
    x.add_argument("--lark", metavar="GRAMMAR", help="the answer matches this Lark grammar (text, or @FILE)")


def grammar_from_args(args):
    """The ``Grammar`` the flags ask for, or None; ``@FILE`` reads the schema or grammar from FILE."""
    from pathlib import Path

    from internlm_core.structured import Grammar

    def text(value: str) -> str:
        return Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value

    if getattr(args, "json_schema", None):
        return Grammar("json_schema", text(args.json_schema))
    if getattr(args, "json_object", False):
        return Grammar("json_object")
    if getattr(args, "regex", None):
        return Grammar("regex", args.regex)
    if getattr(args, "choice", None):
        return Grammar("choice", choices=tuple(args.choice))
    if getattr(args, "lark", None):
        return Grammar("lark", text(args.lark))
    return None


def sampling_from_args(args):
    from internlm_core.generation import SCALAR_PARAMS, SamplingParams

    given = {name: getattr(args, name) for name in SCALAR_PARAMS if getattr(args, name) is not None}
    return SamplingParams(stop=tuple(args.stop), grammar=grammar_from_args(args), **given).validate()


def prompt_messages(args) -> list[dict]:
    """The chat ``--chat`` sends: the system turn, if any, then the prompt as the user's."""
    messages = [{"role": "system", "content": args.system}] if getattr(args, "system", None) else []
    return messages + [{"role": "user", "content": args.prompt}]


def generate(args) -> int:
    if (args.prompt is None) == (args.ids is None):
        raise ValueError("give either a PROMPT or --ids")
    if args.thinking and not args.chat:
        raise ValueError("--thinking is a chat mode: add --chat")
    if not args.model:
        if args.quantize:
            raise ValueError("--quantize applies to a local --model (a worker quantises with its own --quantize)")
        if args.speculate not in (None, "off") or args.draft_model:
            raise ValueError(f"{'--draft-model' if args.draft_model else '--speculate ' + args.speculate} applies to a "
                             "local --model (the stack's workers speculate by their own options; --speculate off "
                             "opts this request out)")
        from services.cli.remote import remote_generate  # gRPC lives in services, never in the core

        return remote_generate(args)
    from pathlib import Path

    from internlm_core.checkpoint import read_config
    from internlm_core.engine import open_engine
    from internlm_core.generation import generate as core_generate
    from internlm_core.tokenizer import Tokenizer

    params = sampling_from_args(args)
    if params.seed is None:  # pick the seed here so that it can be reported
        import secrets

        params = params.replace(seed=secrets.randbits(31))
    if not Path(args.model).is_dir():
        raise ValueError(f"model folder not found: {args.model}")
    cfg = read_config(args.model)
    tok = Tokenizer.for_model(args.model, cfg.family)
    if args.ids:
        prompt = [int(x) for x in args.ids.split(",") if x.strip()]
    elif args.chat:
        from internlm_core.tokenizer import thinking_chat

        messages = prompt_messages(args)
        prompt = tok.encode_chat(thinking_chat(messages, cfg.family) if args.thinking else messages,
                                 allow_special=args.allow_special_tokens)
    else:
        prompt = tok.encode(args.prompt, allow_special=args.allow_special_tokens)
    if len(prompt) >= cfg.max_position_embeddings:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the model's "
                         f"{cfg.max_position_embeddings} positions")
    speculate = args.speculate or ("auto" if args.draft_model else "off")  # a draft given is used
    draft_cfg = check_draft_model(speculate, args.draft_model, args.model, cfg, tok)  # before any weights load
    max_len = min(cfg.max_position_embeddings, len(prompt) + params.max_new_tokens + 1)
    limit = draft_cfg and draft_cfg.position_limit
    if limit and max_len > limit:  # the draft's engine holds the target's positions
        raise ValueError(f"--draft-model {args.draft_model}: the prompt and --max-new-tokens take {max_len} "
                         f"positions, the draft model has {limit}")
    engine = open_engine(args.model, max_batch=1, max_len=max_len, quantize=args.quantize,
                         cache_dtype=args.kv_cache_dtype)
    if speculate == "auto":  # as the worker's
        speculate = "draft" if draft_cfg else "ngram" if engine.kernels else "off"
    counts = SpeculationCounts(speculate)
    if speculate == "off":
        events = core_generate(engine, prompt, params, tok)
    else:
        events = speculative_generate(engine, tok, prompt, params, speculate, args, counts)
    ids, reason, text = [], None, []
    for ev in events:
        ids.append(ev.token_id)
        text.append(ev.text)
        reason = ev.finish_reason
        if not args.json:
            print(ev.text, end="", flush=True)
    if args.json:
        out = {"token_ids": ids, "text": "".join(text), "finish_reason": reason, "prompt_tokens": len(prompt),
               "seed": params.seed}
        if speculate != "off":
            out["speculation"] = vars(counts)
        print(json.dumps(out, ensure_ascii=False))
    else:
        print()
    return 0


class SpeculationCounts(BatcherMetrics):
    """What a local speculative run reports with --json: the method, proposals made and kept."""

    def __init__(self, method: str):
        self.method, self.proposed, self.accepted, self.steps = method, 0, 0, 0

    def speculation(self, proposed, accepted, method):
        self.proposed += proposed
        self.accepted += accepted
        self.steps += 1


def speculative_generate(engine, tok, prompt, params, speculate, args, counts):
    """The events of one request through a one-slot batcher that speculates (as a worker's does);
    ValueError where it cannot (an engine off the CPU kernels)."""
    from internlm_core.engine import open_engine

    draft = None
    if speculate == "draft":  # the same slot and positions, its cache in the same dtype
        draft = open_engine(args.draft_model, max_batch=1, max_len=engine.max_len, quantize=args.quantize,
                            cache_dtype=engine.cache_dtype)
    try:
        batcher = Batcher(engine, tok, metrics=counts, speculate=speculate, draft=draft)
    except ValueError as e:
        raise ValueError(f"--speculate {args.speculate}: {e}") from None
    batcher.start()
    try:
        yield from batcher.submit(prompt, params)
    finally:
        batcher.stop(drain=False, timeout=60)

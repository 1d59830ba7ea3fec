"""The cost of structured output per sampled token: the grammar's mask over the whole vocabulary.

    .venv/bin/python bench/structured_bench.py [--answers 20]

For the InternLM v1 tokenizer (103,168 pieces) and the InternLM2 one (92,544), answers to a JSON
Schema, a regex and a free JSON object are sampled at temperature 1 from random logits (the
grammar's work does not depend on the model), timing in every step: llguidance's mask
(``compute_bitmask``, unpacked to one bool per token: on the mask thread, started by the step
before and computed while the next logits are drawn, as a model's step would compute them), the
whole ``Constraint.mask`` (waiting for that mask if need be, and applying it to the logits) and
the whole ``SequenceState.step`` with the grammar (the critical path), against the same step
without one. Also the one-off costs: llguidance's view of the vocabulary (once per worker)
and compiling each grammar (once per request). Milliseconds, median and 90th percentile.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from internlm_core.generation import SamplingParams, SequenceState  # noqa: E402
from internlm_core.structured import Constraint, Grammar, lltokenizer  # noqa: E402
from internlm_core.tokenizer import Tokenizer  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
TOKENIZERS = {"internlm (103168)": SHARED / "internlm-tokenizer" / "tokenizer.model",
              "internlm2 (92544)": SHARED / "internlm2-tokenizer"}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "colour": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4}}}
GRAMMARS = {"json_schema": Grammar("json_schema", json.dumps(SCHEMA)),
            "regex": Grammar("regex", r"[A-Z][a-z]{2,12}( [a-z]{1,10}){0,8}\."),
            "json_object": Grammar("json_object")}


def ms(values) -> str:
    v = np.asarray(values) * 1e3
    return f"{np.median(v):.3f} / {np.percentile(v, 90):.3f}"


def timed(cls, name: str, into: list) -> None:
    """Wrap ``cls.name`` so that each call's duration is appended to ``into``."""
    inner = getattr(cls, name)

    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            into.append(time.perf_counter() - t)
    setattr(cls, name, wrapper)


BITS, MASKS = [], []
timed(Constraint, "_compute", BITS)
timed(Constraint, "mask", MASKS)


def run(tok, grammar: Grammar | None, answers: int) -> dict:
    steps, compiles = [], []
    BITS.clear()
    MASKS.clear()
    for seed in range(answers):
        rng = np.random.default_rng(seed)
        t = time.perf_counter()
        state = SequenceState([1], SamplingParams(temperature=1.0, seed=seed, max_new_tokens=64, grammar=grammar,
                                                  ignore_eos=grammar is None), tok, tok.vocab_size)
        compiles.append(time.perf_counter() - t)
        while state.finish_reason is None:
            logits = rng.normal(0, 3, tok.vocab_size).astype(np.float32)
            t = time.perf_counter()
            state.step(logits)
            steps.append(time.perf_counter() - t)
    return {"steps": len(steps), "step": ms(steps), "mask": ms(MASKS) if MASKS else "-",
            "bitmask": ms(BITS) if BITS else "-", "compile": ms(compiles) if grammar else "-"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=20)
    args = ap.parse_args()
    for name, path in TOKENIZERS.items():
        tok = Tokenizer(path)
        t = time.perf_counter()
        lltokenizer(tok)
        print(f"{name}: llguidance's view of the vocabulary built in {time.perf_counter() - t:.2f} s")
        print("  grammar      tokens  step (ms, median / p90)  Constraint.mask  llguidance bitmask  compile")
        for gname, grammar in {"none": None, **GRAMMARS}.items():
            r = run(tok, grammar, args.answers)
            print(f"  {gname:12} {r['steps']:6}  {r['step']:23}  {r['mask']:15}  {r['bitmask']:18}  {r['compile']}")


if __name__ == "__main__":
    main()

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

``--model DIR`` (e.g. the demo model) instead runs ``--rows`` rows through that model's engine, as
the batcher does (each row stepped, then one decode step for all), free and under
``structured_serving_bench``'s JSON Schema in alternating blocks, and reports the batcher thread's
CPU time per row and step (its critical path, without the neighbours' noise that wall time has on
a shared machine), the wall time of the step and the mask thread's CPU time per mask.
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
sys.path.insert(0, str(REPO / "bench"))

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


def rows_through_the_model(folder: str, rows: int, blocks: int = 6, steps: int = 12) -> None:
    import threading

    from internlm_core.engine import open_engine
    from structured_serving_bench import PROMPT
    from structured_serving_bench import SCHEMA as ENDLESS  # never complete within the steps run

    tok, engine = Tokenizer(folder), open_engine(folder, max_batch=rows, max_len=512)
    prompt, vocab = tok.encode(PROMPT), engine.config.vocab_size
    grammar = Grammar("json_schema", json.dumps(ENDLESS))

    class Rows:
        def __init__(self, constrained: bool):
            kw = {"grammar": grammar} if constrained else {"ignore_eos": True}
            self.states = [SequenceState(list(prompt), SamplingParams(temperature=1.0, seed=1000 + i, max_new_tokens=500,
                                                                      **kw), tok, vocab) for i in range(rows)]
            self.logits = engine.prefill(list(range(rows)), [st.prompt for st in self.states])
            self.cpu, self.wall, self.n = 0.0, 0.0, 0

        def block(self) -> None:  # the first step of a block is not counted (the other kind ran before it)
            for j in range(steps):
                t, c = time.perf_counter(), time.thread_time()
                for st, row in zip(self.states, self.logits):
                    st.step(row)
                cpu = time.thread_time() - c
                self.logits = engine.decode(np.array([st.generated[-1] for st in self.states], np.int32),
                                            np.array([st.length - 1 for st in self.states], np.int64),
                                            slots=list(range(rows)))
                if j:
                    self.cpu, self.wall, self.n = self.cpu + cpu, self.wall + time.perf_counter() - t, self.n + 1

    mask_cpu = []
    inner = Constraint._compute

    def on_mask_thread(self, doing):
        c = time.thread_time()
        try:
            return inner(self, doing)
        finally:
            if threading.current_thread() is not threading.main_thread():
                mask_cpu.append(time.thread_time() - c)
    Constraint._compute = on_mask_thread
    runs = {"free": Rows(False), "json_schema": Rows(True)}
    for _ in range(blocks):
        for r in runs.values():
            r.block()
    print(f"{Path(folder).name}, {rows} rows, {runs['free'].n} steps each at temperature 1:")
    for name, r in runs.items():
        print(f"  {name:12} batcher thread CPU {r.cpu / r.n / rows * 1e3:.3f} ms per row and step; "
              f"step (sampling + model) {r.wall / r.n * 1e3:.2f} ms wall")
    print(f"  mask thread CPU {np.mean(mask_cpu) * 1e3:.3f} ms per mask")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=20)
    ap.add_argument("--model", help="rows through this model folder's engine instead (see above)")
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    if args.model:
        return rows_through_the_model(args.model, args.rows)
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

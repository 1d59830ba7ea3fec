"""The self-trained demo model that the one-command stack serves.

``ensure_demo_model(models_root)`` returns ``models_root/internlm-demo``, training it on first
use with this project's own trainer (``internlm_core.train.finetune``) from random weights on
the bundled WikiText-2 text (``assets/demo_corpus.txt``, see ``assets/README.md``). The result
has the "demo" preset's shape and the real 103168-token vocabulary, so the real tokenizer and
every service work with it unchanged.

Half of what it trains on is the text itself; the other half teaches it to repeat a passage it
has just read (``copy_rows``), as real models do when asked to quote or edit a given text and as
prompt lookup's proposals need (``speculative.py``): without these the model never learns to
look back at its prompt (on ``bench/speculative_bench.py``'s copy task prompt lookup kept 13% of
its proposals before, 83% now).

Why training is cheap enough for a first start on two CPU cores: the bundled text (~41 KB,
~9.8k tokens) uses only about 2.4k of the 103168 token ids. The model is trained with a
compact vocabulary, the ids the text uses plus one "other" row standing for all the rest,
whose logit carries +log(number of other ids) in the loss (``compact_vocab_loss``). Expanding it afterwards (every unused id gets the
"other" row) gives a full-vocabulary model whose softmax is exactly the one trained: the
unused ids share the "other" probability mass instead of receiving random logits. This
cuts the output layer, which dominates the cost at this size, by a factor of about 40.

Interrupted training resumes from its checkpoints (``models_root/.internlm-demo.work``), if the
recipe and text are still the same; concurrent callers wait on a file lock instead of training twice.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import WEIGHTS_FILE, SafetensorsFile
from .config import Config
from .train_logs import LOSS_PLOT, SCALARS_FILE

DEMO_NAME = "internlm-demo"
DEMO_VERSION = 3  # bump when the recipe changes: an older cached model is then retrained
CORPUS = Path(__file__).parent / "assets" / "demo_corpus.txt"
CORPUS_BYTES = 40_000  # the first WikiText-2 valid articles: small enough to learn well in minutes
MARKER = "demo.json"

# The recipe: 48,000 rows of 128 tokens, half of them ~315 passes over the ~10k-token text (76 rows),
# half copy rows. A model learns to copy late: in batches of 8 it had not after 3,000 steps, and on
# 64-token rows it learnt to repeat a few words, not a passage. ~3 minutes on 2 idle cores.
SEQ_LENGTH = 128
RECIPE = dict(mode="full", lr=2e-3, weight_decay=0.01, warmup_ratio=0.05, min_lr_ratio=0.1, max_steps=1500,
              batch_size=32, grad_accum=1, grad_clip=1.0, save_every=50, keep_last=1, seed=0)
COPY_ROWS = 0.5  # the share of rows that teach the model to repeat a passage it has read (``copy_rows``)


def ensure_demo_model(models_root: Path, cancel: Callable[[], bool] | None = None,
                      progress: Callable[[dict], None] | None = None, max_steps: int | None = None) -> Path:
    """The demo model folder under ``models_root``, trained now if it is missing or stale.

    ``progress(dict)`` receives the trainer's reports (step, total, loss, eta_s...) with
    "stage"; ``cancel()`` stops training between steps (raises ``Cancelled``; the next call
    resumes from the last checkpoint, unless the recipe or text changed meanwhile).
    ``max_steps`` shortens training (tests); a model trained for another number of steps is
    not reused.
    """
    recipe = {**RECIPE, **({"max_steps": max_steps} if max_steps else {})}
    corpus = CORPUS  # read now, so the cache check hashes the very text that training reads
    models_root = Path(models_root)
    models_root.mkdir(parents=True, exist_ok=True)
    target = models_root / DEMO_NAME
    if _is_current(target, recipe, corpus):
        return target
    with open(models_root / f".{DEMO_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training it right now
        if _is_current(target, recipe, corpus):
            return target
        work = models_root / f".{DEMO_NAME}.work"
        key = json.dumps(_key(recipe, corpus), sort_keys=True)
        stamp = work / "key.json"
        if work.exists() and not (stamp.is_file() and stamp.read_text() == key):
            # an interrupted build of another recipe or text: its data and checkpoints are not this one's
            shutil.rmtree(work)
        work.mkdir(exist_ok=True)
        stamp.write_text(key)
        _train(work, target, recipe, cancel, progress, corpus)
        shutil.rmtree(work, ignore_errors=True)
    return target


def _key(recipe: dict, corpus: Path) -> dict:
    """What a demo model is cached by: a change in any of these trains a new one."""
    return {"version": DEMO_VERSION, "recipe": recipe, "corpus_sha256": _corpus_sha256(corpus)}


def _is_current(folder: Path, recipe: dict, corpus: Path) -> bool:
    try:
        meta = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    key = _key(recipe, corpus)
    return all(meta.get(k) == v for k, v in key.items()) and (folder / WEIGHTS_FILE).is_file()


def _corpus_sha256(corpus: Path) -> str:
    return hashlib.sha256(corpus.read_bytes()).hexdigest()


def _train(work: Path, target: Path, recipe: dict, cancel, progress, corpus: Path) -> None:
    from .data import IGNORE, pack_rows, write_dataset
    from .loader import save_model
    from .model import InternLMForCausalLM, init_weights
    from .tokenizer import Tokenizer
    from .train import TrainArgs, finetune

    def report(stage: str, **kw) -> None:
        if progress is not None:
            progress({"stage": stage, **kw})

    full = Config.from_name("demo").replace(name=DEMO_NAME)
    tok = Tokenizer()
    lines = [s for s in (x.strip() for x in corpus.read_text(encoding="utf-8").splitlines()) if s]
    # bos starts and eos ends each paragraph, so a generation stops at the end of one
    streams = [tok.encode(s, eos=True) for s in lines]
    used = np.array(sorted({0, 1, 2}.union(*map(set, streams))), np.int64)  # 0..2 keep their ids
    other = len(used)  # the compact row standing for every unused id
    to_compact = np.full(full.vocab_size, other, np.int32)
    to_compact[used] = np.arange(other, dtype=np.int32)
    compact = full.replace(vocab_size=other + 1, name=f"{DEMO_NAME}-compact")

    data, base = work / "data", work / "base"
    if not data.exists():
        report("prepare")
        rows = []
        for r, n in pack_rows(streams, SEQ_LENGTH + 1):
            # explicit labels: eos (= the pad id) is a target here, padding is not
            rows.append((r, list(r[:n]) + [IGNORE] * (len(r) - n)))
        seen = recipe["max_steps"] * recipe["batch_size"]  # the rows training reads: one pass over these
        copies = round(seen * COPY_ROWS)
        rows = rows * max(1, round((seen - copies) / len(rows))) + list(copy_rows(lines, tok, copies, SEQ_LENGTH + 1))

        def compacted(ids: list[int]) -> np.ndarray:  # IGNORE stays as it is
            ids = np.asarray(ids)
            return np.where(ids == IGNORE, IGNORE, to_compact[ids]).astype(np.int32)

        rows = [{"input_ids": compacted(ids), "labels": compacted(labels)} for ids, labels in rows]
        write_dataset(data, rows, "alpaca", {"rows": len(rows), "source": corpus.name})
    if not base.exists():
        model = InternLMForCausalLM(compact)
        init_weights(model, seed=0, std=0.02)
        save_model(model, compact, base)
    args = TrainArgs(model=str(base), data=str(data), out=str(work / "trained"), overwrite=True, **recipe)
    # the compact "other" id stands for every unused id: log(their number) in the loss
    finetune(args, work / "run", progress=lambda r: report("train", **r), cancel=cancel,
             loss_net=compact_vocab_loss(other, full.vocab_size - other))

    report("expand")
    trained = SafetensorsFile(work / "trained" / WEIGHTS_FILE)
    sd = {n: np.array(trained.get(n), np.float32) for n in trained.keys()}
    for name in ("model.tok_embeddings.embedding_weight", "lm_head.weight"):
        small = sd[name]
        big = np.repeat(small[other:other + 1], full.vocab_size, axis=0)
        big[used] = small[:other]
        sd[name] = big
    history = [json.loads(x) for x in (work / "trained" / SCALARS_FILE).read_text().splitlines()]
    meta = {**_key(recipe, corpus), "corpus": corpus.name, "trained_ids": int(other), "seq_length": SEQ_LENGTH,
            "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]}
    save_model(sd, full, target, overwrite=True,
               extra_files={MARKER: json.dumps(meta, indent=2) + "\n",
                            SCALARS_FILE: (work / "trained" / SCALARS_FILE).read_text()})
    shutil.copyfile(work / "trained" / LOSS_PLOT, target / LOSS_PLOT)
    report("done", path=str(target))


def copy_rows(lines: list[str], tok, count: int, row_len: int, seed: int = 0):
    """``count`` rows of (ids, labels) that teach the model to repeat what it has read, as a real
    model does when asked to edit or quote a passage (and as prompt lookup's proposals need):
    a passage, a blank line, the passage again, the loss on the repeat alone. Half the passages
    are the text's distinct words in random order, which the model cannot have memorised, so the
    repeat is predictable only by looking back at the first copy (it learns to copy from these
    first); the other half are runs of the text's own words, whose common words ("the", "of")
    recur within a passage, so that which one to follow is told by the words before it."""
    from .data import IGNORE, PAD_ID

    rng = np.random.default_rng(seed)
    text = [w for line in lines if not line.startswith("=") for w in line.split()]
    distinct = sorted(set(text))
    for i in range(count):
        n = int(rng.integers(8, 40))
        while True:
            if i % 2:
                start = int(rng.integers(0, len(text) - n))
                passage = " ".join(text[start:start + n])
            else:
                passage = " ".join(distinct[j] for j in rng.integers(0, len(distinct), n))
            head = tok.encode(passage + "\n\n")
            ids = tok.encode(passage + "\n\n" + passage)
            if len(ids) <= row_len:
                break
            n -= 4
        labels = [IGNORE] * len(head) + ids[len(head):]
        pad = row_len - len(ids)
        yield ids + [PAD_ID] * pad, labels + [IGNORE] * pad


def compact_vocab_loss(other: int, count: int):
    """The loss (a ``train_steps.LossNet`` class) of a model trained over a compacted vocabulary,
    where the id ``other`` stands for ``count`` ids: its logit carries +log(count) in the softmax,
    as the ``count`` ids would together once the model is expanded to the full vocabulary."""
    from mindspore import Tensor

    from .train_steps import LossNet

    class CompactVocabLoss(LossNet):
        def __init__(self, model):
            super().__init__(model)
            if not 0 <= other < self.vocab:
                raise ValueError(f"the 'other' id {other} is outside the model's vocabulary of {self.vocab}")
            bias = np.zeros(self.vocab, np.float32)
            bias[other] = math.log(count)
            self.bias = Tensor(bias)

        def logits(self, ids, cos, sin, mask):
            return self.model(ids, cos, sin, mask).reshape(-1, self.vocab) + self.bias

    return CompactVocabLoss


# ---- building the bundled text (run once by a developer; the result ships in assets/) ----------

def detokenize_wikitext(line: str) -> str:
    """Undo WikiText's tokenisation (`` @-@ ``, spaces before punctuation, `` n't``...)."""
    s = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([.,;:!?%)\]}])", r"\1", s)
    s = re.sub(r"([(\[{$]) ", r"\1", s)
    for suffix in ("n't", "'s", "'re", "'ve", "'m", "'ll", "'d"):
        s = s.replace(" " + suffix, suffix)
    s = re.sub(r'" (.*?) "', r'"\1"', s)
    s = re.sub(r"= = = (.*?) = = =", r"=== \1 ===", s)
    return re.sub(r"= = (.*?) = =", r"== \1 ==", s)


def build_corpus(src: Path, max_bytes: int = CORPUS_BYTES) -> str:
    """WikiText-2 (valid) -> the bundled demo text: detokenised, sentences and headings with
    ``<unk>`` or digits left out, whole articles from the start up to ``max_bytes``."""
    out: list[str] = []
    size = 0
    for line in Path(src).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("= ") and not line.startswith("= ="):  # a new article
            if size > max_bytes:
                break
        # Digits are single tokens here, so a small model learns numbers as endless digit runs:
        # sentences with digits are left out along with those holding the <unk> placeholder.
        parts = [line] if line.startswith("=") else re.split(r"(?<= \.) ", line)
        kept = [s for s in parts if "<unk>" not in s and not re.search(r"[0-9]", s)]
        if kept:
            out.append(detokenize_wikitext(" ".join(kept)))
            size += len(out[-1].encode()) + 1
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Rebuild assets/demo_corpus.txt from WikiText-2 valid.txt")
    p.add_argument("src", type=Path)
    CORPUS.write_text(build_corpus(p.parse_args().src), encoding="utf-8")
    print(f"wrote {CORPUS} ({CORPUS.stat().st_size} bytes)")

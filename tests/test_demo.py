"""The demo model comes from this project's trainer; its vocabulary expansion is exact; it is cached.

Training the real recipe takes minutes, so CI runs the same path for a few steps."""
import json

import numpy as np
import pytest

from internlm_core import demo
from internlm_core.config import Config


def test_demo_model_is_trained_by_the_trainer_expanded_and_cached(tmp_path):
    reports = []
    folder = demo.ensure_demo_model(tmp_path, progress=reports.append, max_steps=3)
    assert folder == tmp_path / "internlm-demo"
    stages = [r["stage"] for r in reports]
    assert stages[0] == "prepare" and stages[-1] == "done" and stages.count("train") == 3
    assert [r["step"] for r in reports if r["stage"] == "train"] == [1, 2, 3]
    meta = json.loads((folder / "demo.json").read_text())
    assert meta["recipe"]["max_steps"] == 3 and meta["recipe"]["mode"] == "full"
    history = [json.loads(x) for x in (folder / "scalars.jsonl").read_text().splitlines()]
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert not (tmp_path / ".internlm-demo.work").exists()

    from internlm_core.loader import load_model, state_dict
    from internlm_core.model import forward_inputs
    from internlm_core.tokenizer import Tokenizer

    model = load_model(folder)
    cfg = model.config
    assert cfg == Config.from_name("demo").replace(name="internlm-demo")  # the preset's shape, full vocabulary
    # Every id the text never uses shares one output row, so the full softmax equals the compact one.
    head = state_dict(model)["lm_head.weight"]
    used = meta["trained_ids"]
    rows = np.unique(head, axis=0)
    assert len(rows) == used + 1
    ids = np.array([Tokenizer().encode("The lobster is")])
    logits = model(*forward_inputs(cfg, ids)).asnumpy()[0, -1]
    other = logits[103100]  # an unused placeholder id
    assert np.sum(logits == other) == cfg.vocab_size - used
    assert np.argmax(logits) != 103100

    again = []
    assert demo.ensure_demo_model(tmp_path, progress=again.append, max_steps=3) == folder
    assert again == []  # cached: no training the second time


def test_a_new_recipe_version_or_text_trains_a_new_model(tmp_path, monkeypatch):
    """The cache key is (version, recipe, text's sha256): a change in any one of them alone trains a
    new model (a one-step recipe on a few paragraphs here, to keep it quick), and a build interrupted
    under another key leaves nothing that the next build takes (its packed text, its checkpoint)."""
    import hashlib

    from internlm_core.errors import Cancelled

    paragraphs = [s for s in demo.CORPUS.read_text(encoding="utf-8").splitlines() if s.strip()]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(paragraphs[:6]) + "\n", encoding="utf-8")
    monkeypatch.setattr(demo, "CORPUS", corpus)
    root = tmp_path / "models"
    work = root / ".internlm-demo.work"

    def build(cancel=None):
        reports = []
        folder = demo.ensure_demo_model(root, progress=reports.append, max_steps=1, cancel=cancel)
        meta = json.loads((folder / "demo.json").read_text())
        weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).digest()
        return [(r["stage"], r.get("step")) for r in reports if r["stage"] in ("prepare", "train")], meta, weights

    trained = [("prepare", None), ("train", 1)]  # from the text up: packed anew, one step from step 0
    stages, meta, weights = build()
    assert stages == trained and meta["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert build()[0] == []  # the same key: cached

    # the version alone: the cached model is not taken, training starts (and is interrupted at once)
    version = demo.DEMO_VERSION
    monkeypatch.setattr(demo, "DEMO_VERSION", version + 1)
    with pytest.raises(Cancelled):
        build(cancel=lambda: True)
    assert (work / "data").is_dir() and (work / "base").is_dir()  # what a resume under that key would take
    monkeypatch.setattr(demo, "DEMO_VERSION", version)

    # the text alone: neither the cached model nor the interrupted build's data (of the old text) is used
    corpus.write_text(corpus.read_text(encoding="utf-8") + paragraphs[6] + "\n", encoding="utf-8")
    stages, meta2, weights2 = build()
    assert stages == trained and meta2["version"] == version
    assert meta2["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest() != meta["corpus_sha256"]
    assert meta2["trained_ids"] > meta["trained_ids"]  # the compact vocabulary of the longer text

    monkeypatch.setitem(demo.RECIPE, "lr", demo.RECIPE["lr"] / 4)  # a recipe field alone
    stages, meta3, weights3 = build()
    assert stages == trained and meta3["recipe"]["lr"] == meta2["recipe"]["lr"] / 4
    assert weights3 != weights2  # trained anew with the new learning rate, not the old model kept
    assert not work.exists()

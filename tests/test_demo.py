"""The demo model comes from this project's trainer; its vocabulary expansion is exact; it is cached.

Training the real recipe takes minutes, so CI runs the same path for a few steps."""
import json

import numpy as np

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

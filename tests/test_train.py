"""Fine-tuning a tiny model: loss falls (full, LoRA), LoRA touches only its own weights, merging
is exact, an interrupted run resumes onto the same loss curve, bad arguments are refused."""
import json
import struct
import zlib

import numpy as np
import pytest

from internlm_core.checkpoint import Cancelled
from internlm_core.data import write_dataset
from internlm_core.schedule import batch_rows, lr_at
from internlm_core.train import TrainArgs, Trainer, finetune
from internlm_core.train_state import CKPT_DIR, latest_checkpoint

SEQ = 32


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from internlm_core.config import Config
    from internlm_core.loader import save_model
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name("tiny")
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=0, std=0.1)
    return save_model(model, cfg, tmp_path_factory.mktemp("base") / "tiny")


def progressions(n_rows: int, stride: int, seed: int) -> list[dict]:
    """Rows of arithmetic progressions over the tiny vocabulary: easy to learn, not memorisable
    from one row. Labels mask the first few tokens (as a prompt would be)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        ids = (rng.integers(0, 500) + stride * np.arange(SEQ + 1)) % 500 + 3
        labels = ids.copy()
        labels[:4] = -100
        rows.append({"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32)})
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "prog3", progressions(48, 3, 0), "alpaca", {})


def args_for(base_dir, data_dir, out, **kw) -> TrainArgs:
    defaults = dict(max_steps=30, batch_size=4, lr=5e-3, warmup_ratio=0.1, save_every=0, seed=1)
    return TrainArgs(model=str(base_dir), data=str(data_dir), out=str(out), **{**defaults, **kw})


def mean_loss(history, part):
    losses = [r["loss"] for r in history]
    return float(np.mean(losses[:5] if part == "first" else losses[-5:]))


def test_full_finetune_loss_falls_and_writes_a_model(tmp_path, base_dir, data_dir):
    from internlm_core.loader import load_model

    reports = []
    out = finetune(args_for(base_dir, data_dir, tmp_path / "out", eval_ratio=0.1, eval_every=15), tmp_path / "work",
                   progress=reports.append)
    history = [json.loads(x) for x in (out / "scalars.jsonl").read_text().splitlines()]
    assert len(history) == 30 and mean_loss(history, "last") < 0.6 * mean_loss(history, "first")
    assert [r["step"] for r in reports] == list(range(1, 31))
    for key in ("loss", "lr", "tokens_per_s", "eta_s", "total", "grad_norm"):
        assert key in reports[-1]
    assert "eval_loss" in reports[14] and "eval_ppl" in reports[-1]
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 30 and summary["eval_loss"] == reports[-1]["eval_loss"]
    load_model(out)  # a full model folder the worker can load
    from PIL import Image

    with Image.open(out / "loss.png") as plot:
        assert plot.size == (640, 400)
    tags = read_event_tags(next(out.glob("events.out.tfevents.*")))
    assert {"loss", "lr", "tokens_per_s", "eval_loss"} <= tags


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C, computed here independently of the writer (bitwise, slow, exact)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_tags(path) -> set:
    """Walk a TensorBoard event file, checking every record's framing and CRCs."""
    raw, pos, tags = path.read_bytes(), 0, set()
    while pos < len(raw):
        head = raw[pos:pos + 8]
        (n,) = struct.unpack("<Q", head)
        assert struct.unpack("<I", raw[pos + 8:pos + 12])[0] == _masked_crc(head)
        event = raw[pos + 12:pos + 12 + n]
        assert struct.unpack("<I", raw[pos + 12 + n:pos + 16 + n])[0] == _masked_crc(event)
        pos += 16 + n
        for tag in (b"loss", b"lr", b"tokens_per_s", b"eval_loss"):
            if b"\n" + bytes([len(tag)]) + tag + b"\x15" in event:  # Value{tag=1 (len) ..., simple_value=2 (f32)}
                tags.add(tag.decode())
    return tags


def test_lora_trains_only_adapter_weights_and_merges_exactly(tmp_path, base_dir, tiny_config):
    from internlm_core.loader import load_model, state_dict
    from internlm_core.lora import merge_lora
    from internlm_core.model import forward_inputs

    data = write_dataset(tmp_path / "prog7", progressions(48, 7, 1), "alpaca", {})
    args = args_for(base_dir, data, tmp_path / "adapter", mode="lora", lr=2e-2, lora_targets=".*", lora_dropout=0.05)
    trainer = Trainer(args, tmp_path / "work")
    before = {n: p.asnumpy().copy() for n, p in trainer.model.parameters_and_names()}
    history = trainer.fit()
    assert mean_loss(history, "last") < 0.75 * mean_loss(history, "first")
    changed = {n for n, p in trainer.model.parameters_and_names()
               if not np.array_equal(before[n], p.asnumpy()) and p is not trainer.drop_seed}
    assert changed and all(n.endswith((".lora_a", ".lora_b")) for n in changed)
    assert len(changed) == 2 * 7 * tiny_config.num_layers  # every target's A and B moved
    out = trainer.save()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events")) == \
        ["adapter.safetensors", "adapter_config.json", "loss.png", "scalars.jsonl", "training.json"]

    merged = merge_lora(base_dir, out, tmp_path / "merged")
    ids = np.random.default_rng(3).integers(3, 500, (2, 12))
    trainer._set_dropout_seed(-1.0)  # evaluation: no dropout
    with_adapter = trainer.model(*forward_inputs(tiny_config, ids)).asnumpy()
    merged_logits = load_model(merged)(*forward_inputs(tiny_config, ids)).asnumpy()
    base_logits = load_model(base_dir)(*forward_inputs(tiny_config, ids)).asnumpy()
    np.testing.assert_allclose(merged_logits, with_adapter, atol=1e-4, rtol=1e-4)
    assert np.abs(merged_logits - base_logits).max() > 1e-2  # the adapter matters
    untouched = [n for n in state_dict(load_model(merged)) if ".attention." not in n and ".feed_forward." not in n]
    base_sd, merged_sd = state_dict(load_model(base_dir)), state_dict(load_model(merged))
    assert all(np.array_equal(base_sd[n], merged_sd[n]) for n in untouched)


def test_resume_after_interruption_replays_the_same_curve(tmp_path, base_dir, data_dir):
    # LoRA with dropout and gradient accumulation: the hardest state to restore exactly.
    kw = dict(mode="lora", lr=2e-2, lora_dropout=0.1, grad_accum=2, batch_size=2, max_steps=10, save_every=3,
              keep_last=2)
    first = Trainer(args_for(base_dir, data_dir, tmp_path / "a", **kw), tmp_path / "wa")
    straight = first.fit()
    first.save()

    calls = []
    with pytest.raises(Cancelled):
        Trainer(args_for(base_dir, data_dir, tmp_path / "b", **kw), tmp_path / "wb").fit(
            cancel=lambda: calls.append(1) or len(calls) > 14)  # polled twice a step: stop before step 8
    ckpts = sorted(p.name for p in (tmp_path / "wb" / CKPT_DIR).iterdir())
    assert ckpts == ["step-00000006", "step-00000007"]  # periodic (every 3, last 2 kept) + the cancel one
    # Resume from the periodic checkpoint, not the cancel one, to replay steps 7.. as well.
    import shutil

    shutil.rmtree(latest_checkpoint(tmp_path / "wb"))
    resumed = Trainer(args_for(base_dir, data_dir, tmp_path / "b", **kw), tmp_path / "wb")
    assert resumed.step == 6
    history = resumed.fit()
    resumed.save()
    assert [r["loss"] for r in history] == [r["loss"] for r in straight]
    assert [r["lr"] for r in history] == [r["lr"] for r in straight]
    # and what it leaves behind: the interrupted run's adapter is the uninterrupted one's, bit for bit
    from safetensors.numpy import load_file

    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.safetensors"))
    for f in files:
        a, b = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), f


def test_a_different_run_does_not_resume_a_checkpoint(tmp_path, base_dir, data_dir):
    finetune(args_for(base_dir, data_dir, tmp_path / "a", max_steps=2), tmp_path / "w")
    with pytest.raises(ValueError, match="different run"):
        Trainer(args_for(base_dir, data_dir, tmp_path / "b", max_steps=2, lr=1e-3), tmp_path / "w")


def test_the_training_form_is_recorded_and_a_resume_on_the_other_is_refused(tmp_path, base_dir, data_dir,
                                                                           monkeypatch):
    """"Kernels or not" is decided once per run and written into its checkpoints (the forms agree to
    float rounding only); a resume where the other form runs is refused with both names, and one
    on the same form resumes."""
    from internlm_core import kernels, train_kernels
    from internlm_core.train_state import load_checkpoint

    if not train_kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable() or kernels.training_unavailable()}")
    kw = dict(max_steps=3, save_every=1)
    first = Trainer(args_for(base_dir, data_dir, tmp_path / "a", **kw), tmp_path / "w")
    with pytest.raises(Cancelled):
        first.fit(cancel=lambda: first.step >= 1)
    trainer = load_checkpoint(latest_checkpoint(tmp_path / "w"), first.params)
    assert trainer["form"] == "cpu-training-kernels"
    with monkeypatch.context() as m:
        m.setattr(kernels, "library", lambda: None)  # a machine where the kernels do not build
        with pytest.raises(ValueError, match="trained on cpu-training-kernels, and this machine trains on mindspore"):
            Trainer(args_for(base_dir, data_dir, tmp_path / "a", **kw), tmp_path / "w")
    assert Trainer(args_for(base_dir, data_dir, tmp_path / "a", **kw), tmp_path / "w").step == 1


def _crc(args: dict) -> str:
    return f"{zlib.crc32(json.dumps(args, sort_keys=True).encode()):08x}"


# How the trainers before this one wrote a checkpoint's trainer.json, from the arguments (to_dict
# without out and overwrite), the steps, the form and the base precision: each wrote every argument
# it knew, whatever its value. The first (f63d17d) knew neither recompute nor quantize and recorded
# no form; then recompute came (ce8457c); then the form, in the fingerprint and beside it
# (3bd1a3b); then quantize, and the base precision the same way (7ccbf0a).
OLD_WRITERS = {
    "first": lambda a, total, form, base: {"fingerprint": f"{_crc(_without(a, 'recompute', 'quantize'))}-{total}"},
    "recompute": lambda a, total, form, base: {"fingerprint": f"{_crc(_without(a, 'quantize'))}-{total}"},
    "form": lambda a, total, form, base: {"fingerprint": f"{_crc(_without(a, 'quantize'))}-{total}-{form}",
                                          "form": form},
    "base": lambda a, total, form, base: {"fingerprint": f"{_crc(a)}-{total}-{base}-{form}", "form": form,
                                          "base": base},
}


def _without(args: dict, *names) -> dict:
    return {k: v for k, v in args.items() if k not in names}


@pytest.mark.parametrize("writer", OLD_WRITERS)
def test_checkpoints_written_before_the_fingerprint_grew_resume(tmp_path, base_dir, data_dir, writer):
    """A LoRA checkpoint whose trainer.json is as an older trainer wrote it resumes under the same
    arguments (the ones added since at their defaults); a resume with quantize int8 or recompute
    on is still refused, naming what differs."""
    from internlm_core.train_state import TRAINER_FILE

    kw = dict(mode="lora", max_steps=3, save_every=1)
    first = Trainer(args_for(base_dir, data_dir, tmp_path / "a", **kw), tmp_path / "w")
    with pytest.raises(Cancelled):
        first.fit(cancel=lambda: first.step >= 1)
    saved = latest_checkpoint(tmp_path / "w") / TRAINER_FILE
    trainer = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("fingerprint", "form", "base")}
    args = _without(first.args.to_dict(), "out", "overwrite")
    trainer.update(OLD_WRITERS[writer](args, first.total, first.ops.name, first.base))
    saved.write_text(json.dumps(trainer))

    assert Trainer(args_for(base_dir, data_dir, tmp_path / "a", **kw), tmp_path / "w").step == 1
    with pytest.raises(ValueError, match="quantize int8"):
        Trainer(args_for(base_dir, data_dir, tmp_path / "a", quantize="int8", **kw), tmp_path / "w")
    with pytest.raises(ValueError, match="recompute True, where its run had False"):
        Trainer(args_for(base_dir, data_dir, tmp_path / "a", recompute=True, **kw), tmp_path / "w")
    with pytest.raises(ValueError, match="different run"):
        Trainer(args_for(base_dir, data_dir, tmp_path / "a", **{**kw, "lr": 1e-3}), tmp_path / "w")


@pytest.mark.parametrize("change, message", [
    (dict(lr=-1e-4), "lr"), (dict(lr=0), "lr"), (dict(mode="qlora"), "mode"), (dict(batch_size=0), "batch_size"),
    (dict(warmup_ratio=1.5), "warmup_ratio"), (dict(weight_decay=-0.1), "weight_decay"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(grad_accum=1.5), "grad_accum"), (dict(eval_ratio=0.9), "eval_ratio"), (dict(dtype="int8"), "dtype"),
    (dict(mode="lora", lora_rank=0), "lora_rank"), (dict(mode="lora", lora_targets="q_proj"), "match none"),
    (dict(mode="lora", lora_dropout=1.0), "lora_dropout"), (dict(loss_scale=0.5), "loss_scale"),
    (dict(epochs=0), "epochs"), (dict(keep_last=0), "keep_last"), (dict(recompute="yes"), "recompute"),
    (dict(mode="lora", quantize="int4"), "quantize"), (dict(quantize="int8"), "quantize int8 applies to LoRA"),
])
def test_bad_arguments_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        TrainArgs(model="m", data="d", out="o", **change).validate()


def test_bad_runs_are_rejected(tmp_path, base_dir, data_dir, chat_model_dir):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        Trainer(args_for(base_dir, data_dir, tmp_path / "exists"), tmp_path / "w")
    too_long = write_dataset(tmp_path / "long", [{"input_ids": np.full(300, 5, np.int32)}], "wikitext", {})
    with pytest.raises(ValueError, match="positions"):
        Trainer(args_for(base_dir, too_long, tmp_path / "o"), tmp_path / "w")
    big_ids = write_dataset(tmp_path / "big", [{"input_ids": np.full(9, 600, np.int32)}], "wikitext", {})
    with pytest.raises(ValueError, match="vocabulary"):
        Trainer(args_for(base_dir, big_ids, tmp_path / "o"), tmp_path / "w")


def test_the_trainer_reads_each_batch_from_disk(tmp_path, base_dir, data_dir):
    """The dataset is not held in memory: the trainer's rows are those of the dataset, read from
    its copy on disk when a batch is made, so a change to that file shows in the next batch."""
    from internlm_core.data import RowFile, load_rows

    trainer = Trainer(args_for(base_dir, data_dir, tmp_path / "o"), tmp_path / "w")
    assert isinstance(trainer.row_file, RowFile)
    assert not [k for k, v in vars(trainer).items() if isinstance(v, np.ndarray) and v.ndim > 1]  # no rows held
    ids, labels = load_rows(data_dir)
    rows = trainer.train_rows[batch_rows(0, 4, trainer.n_train, 1)]
    got_ids, got_labels = (x.asnumpy() for x in trainer._micro_batch(0))
    assert np.array_equal(got_ids, ids[rows, :-1]) and np.array_equal(got_labels, labels[rows, 1:])
    on_disk = np.load(trainer.row_file.path, mmap_mode="r+")
    on_disk[rows, 0] = 11
    on_disk.flush()
    del on_disk
    assert (trainer._micro_batch(0)[0].asnumpy() == 11).all()


def test_schedule_and_data_order():
    lrs = [lr_at(s, 100, 1e-3, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-2)  # cosine to min_lr_ratio
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # one epoch of batches covers every row once; the next epoch is another order
    epoch0 = np.concatenate([batch_rows(m, 5, 20, 0) for m in range(4)])
    epoch1 = np.concatenate([batch_rows(m, 5, 20, 0) for m in range(4, 8)])
    assert sorted(epoch0) == list(range(20)) == sorted(epoch1) and list(epoch0) != list(epoch1)


DP_WORKER = """
import json, sys
import numpy as np
from internlm_core.train import TrainArgs, Trainer
trainer = Trainer(TrainArgs(**json.loads(sys.argv[1])), sys.argv[2])
history = trainer.fit()
trainer.save()
weights = np.concatenate([p.asnumpy().ravel() for p in trainer.model.trainable_params()])
print("DP-RESULT " + json.dumps({"rank": trainer.rank, "world": trainer.world, "losses": [r["loss"] for r in history],
                                 "weights": weights[::97].tolist()}), flush=True)
"""


def test_data_parallel_over_two_cpu_workers_with_msrun(tmp_path, base_dir, data_dir):
    """msrun starts two workers that join MindSpore's communication group on this CPU; each
    takes half of every global batch and gradients are averaged, so the run matches one
    process with the whole batch, and both ranks hold the same weights."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import REPO, free_port

    msrun = Path(sys.executable).parent / "msrun"
    script = tmp_path / "dp_worker.py"
    script.write_text(DP_WORKER)
    kw = dict(max_steps=3, lr=5e-3, warmup_ratio=0.0)
    dp_args = args_for(base_dir, data_dir, tmp_path / "dp-out", batch_size=2, **kw).to_dict()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    subprocess.run([str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                    f"--log_dir={tmp_path / 'logs'}", "--join=True", str(script), json.dumps(dp_args),
                    str(tmp_path / "dp-work")], env=env, cwd=tmp_path, timeout=300, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = [json.loads(m) for log in (tmp_path / "logs").glob("worker_*.log")
               for m in re.findall(r"^DP-RESULT (.*)$", log.read_text(), re.M)]
    assert sorted((r["rank"], r["world"]) for r in results) == [(0, 2), (1, 2)]
    assert results[0]["weights"] == results[1]["weights"]  # averaged gradients keep the replicas equal
    assert (tmp_path / "dp-out" / "model.safetensors").is_file()  # rank 0 alone writes the output
    single = Trainer(args_for(base_dir, data_dir, tmp_path / "one", batch_size=4, **kw), tmp_path / "one-work").fit()
    dp_mean = np.mean([r["losses"] for r in results], axis=0)
    np.testing.assert_allclose(dp_mean, [r["loss"] for r in single], rtol=1e-5)


def test_lora_dropout_follows_the_step_seed_in_compiled_graphs(tmp_path, base_dir, data_dir):
    from mindspore import Tensor

    trainer = Trainer(args_for(base_dir, data_dir, tmp_path / "o", mode="lora", lora_dropout=0.5), tmp_path / "w")
    for p in trainer.model.trainable_params():  # a non-zero B so dropout shows in the output
        p.set_data(Tensor(np.full(p.shape, 0.05, np.float32)))
    ids, labels = trainer._micro_batch(0)

    def loss(seed):
        trainer._set_dropout_seed(seed)
        total, count = trainer.steps.evaluate(ids, labels, *trainer.fixed)
        return float(total) / float(count)

    a, b, a2, off = loss(1.0), loss(2.0), loss(1.0), loss(-1.0)
    assert a != b and a == a2  # a new mask per seed, the same mask for the same seed
    trainer._set_dropout_seed(-1.0)
    from internlm_core.model import forward_inputs
    import mindspore.ops as ops
    logits = trainer.model(*forward_inputs(trainer.config, ids.asnumpy()))
    ref = float(ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100))
    assert off == pytest.approx(ref, rel=1e-5)  # seed -1: no dropout


def test_loss_scaling_path_gives_the_same_training(tmp_path, base_dir, data_dir):
    """Dynamic loss scaling (what float16 needs) scales by powers of two: in fp32 it must change nothing."""
    plain = Trainer(args_for(base_dir, data_dir, tmp_path / "a", max_steps=4), tmp_path / "wa").fit()
    scaled_trainer = Trainer(args_for(base_dir, data_dir, tmp_path / "b", max_steps=4, loss_scale="dynamic"),
                             tmp_path / "wb")
    scaled = scaled_trainer.fit()
    assert float(scaled_trainer.steps.scale.asnumpy()) == 2.0 ** 16
    np.testing.assert_allclose([r["loss"] for r in scaled], [r["loss"] for r in plain], rtol=1e-6)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recompute_gives_the_same_training(tmp_path, base_dir, data_dir, mode):
    """Recomputing each block's activations in the backward pass trades compute for memory and
    must change nothing else: the same losses, in full and LoRA mode (whose dropout masks are a
    hash of the step's seed, so the recomputed forward draws the same ones)."""
    kw = dict(mode=mode, max_steps=3, lr=2e-2 if mode == "lora" else 5e-3, lora_targets=".*", lora_dropout=0.1)
    plain = Trainer(args_for(base_dir, data_dir, tmp_path / "a", **kw), tmp_path / "wa").fit()
    trainer = Trainer(args_for(base_dir, data_dir, tmp_path / "b", recompute=True, **kw), tmp_path / "wb")
    # Every cell of every block is marked, LoRA's included (recompute() marks the cells present at
    # the call); MindSpore adds its PyNative wrapper, _recompute_cell, beside them.
    assert all(cell._has_config_recompute for layer in trainer.model.model.layers
               for name, cell in layer.cells_and_names() if not name.startswith("_recompute_cell"))
    assert not trainer.model.lm_head._has_config_recompute
    np.testing.assert_allclose([r["loss"] for r in trainer.fit()], [r["loss"] for r in plain], rtol=1e-5)


def test_dynamic_loss_scale_backs_off_on_overflow_skips_the_step_and_recovers(tmp_path, base_dir, data_dir):
    """fp16 needs a GPU here, so overflows are forced in fp32: from 2**127, the largest power of two
    a float32 holds, and a final norm ten times larger (so that the head's gradients pass 2), the
    scaled gradients overflow on the first step and on some later ones. Such a step must leave the
    weights (and Adam's step count) alone and halve the scale; a clean step updates at an unchanged
    scale; and training goes on to learn."""
    import mindspore as ms
    from mindspore import Tensor, ops

    trainer = Trainer(args_for(base_dir, data_dir, tmp_path / "o", loss_scale="dynamic"), tmp_path / "w")
    ops.assign(trainer.steps.scale, Tensor(2.0 ** 127, ms.float32))  # in place, as the graph reads it
    norm = trainer.model.model.norm_out.weight
    ops.assign(norm, norm * 10.0)
    first = trainer._micro_batch(0)

    def first_batch_loss():
        total, count = trainer.steps.evaluate(*first, *trainer.fixed)
        return float(total) / float(count)

    start = first_batch_loss()

    def state():
        weights = np.concatenate([p.asnumpy().ravel() for p in trainer.model.trainable_params()])
        return weights, float(trainer.steps.scale.asnumpy()), trainer.opt.global_step.asnumpy().item()

    overflows = []
    while trainer.step < trainer.total:
        weights, scale, adam_step = state()
        rec = trainer.train_step()
        overflow = not np.isfinite(rec["grad_norm"])
        overflows.append(overflow)
        new_weights, new_scale, new_adam_step = state()
        assert new_scale == (scale / 2 if overflow else scale)
        assert np.array_equal(new_weights, weights) == overflow
        assert new_adam_step == adam_step + (0 if overflow else 1)
    assert overflows[0] and overflows.count(False) >= 20  # the back-off ran, and clean steps followed
    assert first_batch_loss() < 0.6 * start  # and they trained the model


def test_the_demos_compact_vocabulary_loss(tmp_path, base_dir, data_dir):
    """The demo's loss (``demo.compact_vocab_loss``: its "other" id stands for ``count`` ids) is the
    cross-entropy of the model's logits with +log(count) on that id, compared with numpy on the
    first batch, where the plain loss has none; an id outside the vocabulary is refused."""
    import math

    from internlm_core.demo import compact_vocab_loss
    from internlm_core.model import forward_inputs
    from internlm_core.train import Trainer

    other, count = 7, 1000
    losses = {}
    for name, loss_net in (("plain", {}), ("demo", {"loss_net": compact_vocab_loss(other, count)})):
        t = Trainer(args_for(base_dir, data_dir, tmp_path / f"out-{name}", batch_size=8, eval_ratio=0.0),
                    tmp_path / name, **loss_net)
        ids, labels = (x.asnumpy() for x in t._micro_batch(0))
        logits = t.model(*forward_inputs(t.config, ids)).asnumpy().reshape(-1, t.config.vocab_size)
        if name == "demo":
            logits[:, other] += math.log(count)
        z = logits - logits.max(-1, keepdims=True)
        lse = np.log(np.exp(z).sum(-1))
        flat, keep = labels.reshape(-1), labels.reshape(-1) != -100
        losses[name] = float(np.mean(lse[keep] - z[keep, flat[keep]]))
        got = float(t.steps.evaluate(*t._micro_batch(0), *t.fixed)[0]) / float(keep.sum())
        np.testing.assert_allclose(got, losses[name], rtol=1e-5)
    assert abs(losses["demo"] - losses["plain"]) > 1e-3  # the bias changed the loss
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        Trainer(args_for(base_dir, data_dir, tmp_path / "out-bad"), tmp_path / "bad-work",
                loss_net=compact_vocab_loss(600, 2))


def test_the_cpu_kernels_train_as_mindspores_ops_do(tmp_path, base_dir, data_dir, monkeypatch):
    """The training kernels (GEMMs, attention, norms, SwiGLU, loss, AdamW) against MindSpore's own
    ops on the same run, full and LoRA (dropout off: the two draw different masks): every gradient
    of the first batch, then the losses and gradient norms step after step, equal to float rounding."""
    import mindspore as ms
    from mindspore import Tensor, nn

    from internlm_core import kernels, train_kernels

    if not train_kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable() or kernels.training_unavailable()}")

    class Grads(nn.Cell):  # the step's own gradient function, compiled
        def __init__(self, steps):
            super().__init__()
            self.grad_fn = steps.grad_fn

        @ms.jit
        def construct(self, *args):
            return self.grad_fn(*args)[1]

    def first_grads(trainer):
        batch = (*trainer._micro_batch(0), *trainer.fixed, Tensor(1.0, ms.float32))
        return [g.asnumpy() for g in Grads(trainer.steps)(*batch)]

    for mode in ("full", "lora"):
        kw = dict(max_steps=6, mode=mode, lora_dropout=0.0, eval_ratio=0.1, eval_every=3)
        fast = Trainer(args_for(base_dir, data_dir, tmp_path / f"{mode}-k", **kw), tmp_path / f"{mode}-kw")
        assert fast.model.ops.name == "cpu-training-kernels" and fast.opt.kernel is not None
        with monkeypatch.context() as m:
            m.setattr(kernels, "library", lambda: None)
            plain = Trainer(args_for(base_dir, data_dir, tmp_path / f"{mode}-p", **kw), tmp_path / f"{mode}-pw")
            assert plain.model.ops.name == "mindspore" and plain.opt.kernel is None
            want = first_grads(plain)
            ref = plain.fit()
        for name, g, w in zip(fast.opt.parameters, first_grads(fast), want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=f"{mode} {name.name}")
        got = fast.fit()
        for key in ("loss", "grad_norm", "eval_loss"):
            np.testing.assert_allclose([r.get(key, 0.0) for r in got], [r.get(key, 0.0) for r in ref], rtol=1e-4,
                                       err_msg=f"{mode} {key}")


def test_a_lora_step_computes_no_gradient_for_the_frozen_weights(tmp_path, base_dir, data_dir):
    """Measured work, not a promise: the GEMMs of one LoRA step count exactly the forward and
    input-gradient work of every linear and weight-gradient work for the adapters' A and B alone."""
    from internlm_core import kernels, train_kernels
    from internlm_core.lora import module_shape, target_modules

    if not train_kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable() or kernels.training_unavailable()}")
    trainer = Trainer(args_for(base_dir, data_dir, tmp_path / "o", mode="lora", lora_rank=4), tmp_path / "w")
    trainer.train_step()  # compiles
    before = train_kernels.gemm_flops()
    trainer.train_step()
    work = {k: train_kernels.gemm_flops()[k] - before[k] for k in before}
    cfg, tokens, r = trainer.config, 4 * trainer.seq, 4
    adapters = [module_shape(cfg, m) for m in target_modules(cfg, trainer.args.adapter_spec().targets)]
    assert work["weight_grad"] == sum(2 * tokens * r * (n_in + n_out) for n_out, n_in in adapters)
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_heads * cfg.head_dim
    base = cfg.num_layers * (2 * h * h + 2 * kv * h + 3 * h * i) + cfg.vocab_size * h
    assert work["forward"] == 2 * tokens * base + sum(2 * tokens * r * (n_in + n_out) for n_out, n_in in adapters)
    full = Trainer(args_for(base_dir, data_dir, tmp_path / "f", mode="full"), tmp_path / "fw")
    full.train_step()
    before = train_kernels.gemm_flops()
    full.train_step()
    assert train_kernels.gemm_flops()["weight_grad"] - before["weight_grad"] == 2 * tokens * base  # every weight trains

"""LoRA fine-tuning of a bf16 or int8 base (QLoRA-like): the frozen base held in its own precision on
the training kernels (FrozenLinear), the adapters fp32. Its loss and LoRA gradients equal an fp32
model's holding the same values; a run trains, saves an adapter that serves, resumes exactly, and
records the base's precision (a resume on another refused by name)."""
import json
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from internlm_core import kernels
from internlm_core.checkpoint import Cancelled
from internlm_core.config import Config
from internlm_core.data import write_dataset
from internlm_core.engine import Engine, open_engine
from internlm_core.forms import TRAINING_KERNELS, training_ops
from internlm_core.loader import load_frozen_base, load_model, save_model, state_dict
from internlm_core.lora import AdapterSpec, inject_lora, merge_lora
from internlm_core.model import InternLMForCausalLM, forward_inputs, init_weights
from internlm_core.quantize import dequantize_int8, quantize_int8, quantized_names
from internlm_core.train import TrainArgs, Trainer
from internlm_core.train_state import latest_checkpoint
from internlm_core.train_steps import LossNet
from tests.helpers import REPO
from tests.test_train import progressions

pytestmark = pytest.mark.skipif(training_ops().name != TRAINING_KERNELS,
                                reason=f"training kernels unavailable: {kernels.training_unavailable()}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_hf):
    """The tiny model (q/k/v/o biases) in fp32 and in bf16; an int8 folder (``internlm convert
    --quantize int8`` of the HF tiny model); the dataset."""
    from internlm_core.convert import hf_to_ms

    root = tmp_path_factory.mktemp("qlora")
    cfg = Config.from_name("tiny")
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=0, std=0.1)
    hf_to_ms(tiny_hf[1], root / "int8", quantize="int8")
    return {"fp32": save_model(model, cfg, root / "fp32"),
            "bf16": save_model(model, cfg, root / "bf16", dtype="bfloat16"),
            "int8": root / "int8",
            "data": write_dataset(root / "prog7", progressions(48, 7, 1), "alpaca", {})}


def fp32_folder_of(folder, quantize, out):
    """An fp32 folder holding the values a base held from ``folder`` stands for: bf16's widened, or
    int8's dequantised (numpy's quantize_int8 then dequantize_int8)."""
    model = load_model(folder)
    sd = state_dict(model)
    if quantize:
        for name in quantized_names(model.config):
            sd[name] = dequantize_int8(*quantize_int8(sd[name]))
    return save_model(sd, model.config.replace(dtype="float32", quantization=None), out)


class _LossAndGrads(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.net = LossNet(model)
        self.grad = ms.value_and_grad(self.net, None, ms.ParameterTuple(model.trainable_params()))

    @ms.jit
    def construct(self, *args):
        return self.grad(*args)


SPEC = AdapterSpec(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))


def loss_and_lora_grads(model):
    """Loss and the gradients of every LoRA A and B of one batch, B set non-zero (at zero A's
    gradient would be zero), the same adapters whatever the base."""
    inject_lora(model, SPEC, seed=3)
    rng = np.random.default_rng(5)
    for name, p in model.parameters_and_names():
        if name.endswith(".lora_b"):
            p.set_data(Tensor(rng.normal(scale=0.2, size=p.shape).astype(np.float32)))
    model.set_train(True)
    rows = progressions(3, 7, 2)
    ids = np.stack([r["input_ids"][:-1] for r in rows])
    labels = np.stack([r["labels"][1:] for r in rows])
    loss, grads = _LossAndGrads(model)(Tensor(ids), Tensor(labels), *forward_inputs(model.config, ids)[1:],
                                       Tensor(1.0, ms.float32))
    names = [p.name for p in model.trainable_params()]
    assert len(names) == 2 * 7 * model.config.num_layers and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    return float(loss.asnumpy()), {n: g.asnumpy() for n, g in zip(names, grads)}


@pytest.mark.parametrize("source,quantize,held", [("bf16", None, ms.bfloat16), ("fp32", "int8", ms.int8),
                                                  ("bf16", "int8", ms.int8), ("int8", None, ms.int8)])
def test_lora_on_a_held_base_equals_fp32_on_its_values(folders, tmp_path, source, quantize, held):
    """Loss and every LoRA gradient on a base held as bf16, or int8 (quantised at load, or an int8
    folder's) equal those of an fp32 model holding the same values, within fp32 rounding; the base's
    linears are held in their precision (no fp32 copy), the embedding table too."""
    ops = training_ops()
    model = load_frozen_base(folders[source], ops, quantize)
    linears = [p for n, p in model.parameters_and_names() if n in quantized_names(model.config)]
    assert linears and all(p.dtype == held and len(p.shape) == 2 for p in linears)
    table = {"bf16": ms.bfloat16, "fp32": ms.float32, "int8": ms.float32}[source]  # the tiny HF model is fp32
    assert model.model.tok_embeddings.embedding_weight.dtype == table
    loss, grads = loss_and_lora_grads(model)

    reference = fp32_folder_of(folders[source], quantize, tmp_path / "values")
    ref_model = load_model(reference, ops=ops)
    assert all(p.dtype == ms.float32 for p in ref_model.get_parameters())
    ref_loss, ref_grads = loss_and_lora_grads(ref_model)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[n], rtol=1e-4, atol=1e-5 * np.abs(ref_grads[n]).max(), err_msg=n)
    assert max(np.abs(g).max() for g in grads.values()) > 1e-3  # the gradients are not all zero


def args_for(folder, data, out, **kw) -> TrainArgs:
    defaults = dict(mode="lora", max_steps=30, batch_size=4, lr=2e-2, warmup_ratio=0.1, save_every=0, seed=1,
                    lora_targets=".*", lora_dropout=0.05)
    return TrainArgs(model=str(folder), data=str(data), out=str(out), **{**defaults, **kw})


def greedy(engine, prompt, adapter=None, n=12):
    """n greedy tokens after ``prompt`` in slot 0 (with adapter index ``adapter``)."""
    ids = None if adapter is None else [adapter]
    logits = engine.prefill([0], [prompt], ids)[0]
    pos, out = len(prompt), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = engine.decode(np.array([out[-1]]), np.array([pos]), ids, slots=[0])[0]
        pos += 1
    return out


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_lora_on_a_bf16_folder_trains_saves_and_serves(folders, tmp_path, quantize):
    """A LoRA fine-tune of the bf16 folder (its base held as bf16, or int8 with quantize): the loss
    falls, only the adapters move, the precision is recorded, and the adapter served on the same
    base gives the merged model's greedy tokens."""
    trainer = Trainer(args_for(folders["bf16"], folders["data"], tmp_path / "adapter", quantize=quantize),
                      tmp_path / "work")
    assert trainer.base == ("bfloat16" if quantize == "none" else "int8")
    history = trainer.fit()
    losses = [r["loss"] for r in history]
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    out = trainer.save()
    summary = json.loads((out / "training.json").read_text())
    assert summary["base_precision"] == trainer.base and summary["args"]["quantize"] == quantize

    q = None if quantize == "none" else quantize
    served = open_engine(folders["bf16"], max_batch=1, max_len=64, quantize=q, cache_dtype="float32")
    served.load_adapter("tuned", out)
    merged = merge_lora(fp32_folder_of(folders["bf16"], q, tmp_path / "values"), out, tmp_path / "merged")
    reference = Engine(load_model(merged), max_batch=1, max_len=64, cache_dtype="float32")
    base = open_engine(folders["bf16"], max_batch=1, max_len=64, quantize=q, cache_dtype="float32")
    prompts = ([5, 12, 19, 26], [100, 107, 114])
    for prompt in prompts:
        assert greedy(served, prompt, 1) == greedy(reference, prompt)
    assert any(greedy(served, p, 1) != greedy(base, p) for p in prompts)  # the adapter matters


@pytest.mark.parametrize("quantize,held,other,other_held", [("int8", "int8", "none", "bfloat16"),
                                                          ("none", "bfloat16", "int8", "int8")],
                         ids=["int8-base", "bf16-base"])
def test_a_held_base_resumes_exactly_and_another_precision_is_refused_by_name(folders, tmp_path, quantize, held,
                                                                              other, other_held):
    """LoRA on the bf16 folder, its base held as bf16 or quantised to int8 at load, with dropout and
    gradient accumulation: interrupted and resumed, it replays the uninterrupted run's losses and
    leaves its adapter bit for bit; resuming it with the base in the other precision is refused,
    naming both."""
    kw = dict(quantize=quantize, grad_accum=2, batch_size=2, max_steps=8, save_every=3, keep_last=2, lora_dropout=0.1)
    straight = Trainer(args_for(folders["bf16"], folders["data"], tmp_path / "a", **kw), tmp_path / "wa")
    assert straight.base == held
    history = straight.fit()
    straight.save()

    calls = []
    with pytest.raises(Cancelled):
        Trainer(args_for(folders["bf16"], folders["data"], tmp_path / "b", **kw), tmp_path / "wb").fit(
            cancel=lambda: calls.append(1) or len(calls) > 10)  # polled twice a step: stop after step 5
    shutil.rmtree(latest_checkpoint(tmp_path / "wb"))  # resume from the periodic one (step 3): replay 4..
    with pytest.raises(ValueError, match=f"base precision was {held}, and this run's is {other_held}"):
        Trainer(args_for(folders["bf16"], folders["data"], tmp_path / "b", **{**kw, "quantize": other}),
                tmp_path / "wb")
    resumed = Trainer(args_for(folders["bf16"], folders["data"], tmp_path / "b", **kw), tmp_path / "wb")
    assert resumed.step == 3
    assert [r["loss"] for r in resumed.fit()] == [r["loss"] for r in history]
    resumed.save()
    from safetensors.numpy import load_file

    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_bench_pytorch_reference_starts_from_our_loss(folders, tmp_path, monkeypatch):
    """bench/qlora_bench.py's PyTorch case (HF's Llama holding the bf16 folder's tensors in bf16, fp32
    LoRA adapters) on the batches our trainer draws: its first loss, the frozen base's (the adapters'
    B is zero), equals ours within bf16 rounding (its activations are bf16, ours fp32)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from qlora_bench import torch_lora_run, trainer_batches

    args = args_for(folders["bf16"], folders["data"], tmp_path / "o", max_steps=2, lora_targets="wq|wk|wv|wo")
    trainer = Trainer(args, tmp_path / "w")
    ids, labels = trainer.row_file[np.arange(len(trainer.row_file))]
    ours = [r["loss"] for r in trainer.fit()]
    theirs = torch_lora_run(folders["bf16"], trainer_batches(ids, labels, args, 2), args)["losses"]
    # measured 1.2e-4 apart; the next batch's loss is 3e-2 away, the base without its q/k/v/o
    # biases 2.3e-3, the prompt tokens' labels unmasked 6e-4
    assert theirs[0] == pytest.approx(ours[0], rel=5e-4)


def test_quantize_is_refused_with_full_finetuning_by_name(folders, tmp_path):
    with pytest.raises(ValueError, match="quantize int8 applies to LoRA fine-tuning only"):
        TrainArgs(model=str(folders["bf16"]), data=str(folders["data"]), out=str(tmp_path / "o"), mode="full",
                  quantize="int8").validate()
    with pytest.raises(ValueError, match="quantize must be one of"):
        args_for(folders["bf16"], folders["data"], tmp_path / "o", quantize="int4").validate()


def test_an_int4_base_is_refused_by_name(folders, tiny_hf, tmp_path):
    """int4 serves; FrozenLinear reads int8 at most, so a LoRA run on an int4 folder says so before
    loading, on either form."""
    from internlm_core.convert import hf_to_ms
    from internlm_core.errors import CheckpointError
    from internlm_core.forms import MindSporeOps

    hf_to_ms(tiny_hf[1], tmp_path / "int4", quantize="int4")
    for ops in (training_ops("float32"), MindSporeOps()):
        with pytest.raises(CheckpointError, match="LoRA on an int4 base is not built"):
            load_frozen_base(tmp_path / "int4", ops)


def test_without_the_training_kernels_the_base_is_an_fp32_copy_of_the_same_values(folders):
    """MindSpore's ops read no bf16 or int8 weights on CPU: there the base is fp32 holding the values
    the held base stands for (int8's dequantised), so both forms train the same model."""
    from internlm_core.forms import MindSporeOps

    model = load_frozen_base(folders["bf16"], MindSporeOps(), "int8")
    assert all(p.dtype == ms.float32 for p in model.get_parameters())
    got, want = state_dict(model), state_dict(load_model(folders["bf16"]))
    for name in quantized_names(model.config):
        np.testing.assert_array_equal(got[name], dequantize_int8(*quantize_int8(want[name])))
    assert np.array_equal(got["model.norm_out.weight"], want["model.norm_out.weight"])

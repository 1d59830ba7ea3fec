"""The execution forms (``forms``): chosen once when a model is built and used by every layer; LoRA
dropout one mask on both training forms."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from internlm_core import kernels, train_kernels
from internlm_core.config import Config
from internlm_core.forms import (MindSporeOps, ServingKernels, TrainingKernels, dropout_constants, dropout_cut,
                                 training_ops)
from internlm_core.model import InternLMForCausalLM, Linear

MASK = (1 << 64) - 1


def splitmix(z: int) -> int:
    """splitmix64's finaliser, in Python integers: the mask's definition written out once more."""
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & MASK
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & MASK
    return z ^ (z >> 31)


def reference_keep(n: int, seed: float, salt: float, p: float) -> np.ndarray:
    key = splitmix(((int(seed) << 32) ^ int(np.float32(salt))) & MASK)
    cut = dropout_constants(p)[0]
    return np.array([(splitmix((key + i) & MASK) >> 40) >= cut for i in range(n)])


class _Dropout(nn.Cell):
    """A form's dropout, and its input gradient, in one compiled graph as the trainer's step runs it."""

    def __init__(self, form, p, salt):
        super().__init__()
        self.form = form
        self.seed = Parameter(Tensor(-1.0, ms.float32), name="seed", requires_grad=False)
        self.cfg, self.cut, self.scale = Tensor([p, salt], ms.float32), dropout_cut(p), dropout_constants(p)[1]

    def construct(self, x, probe):
        return (self.dropout(x) * probe).sum()

    def dropout(self, x):
        return self.form.dropout(x, self.seed, self.cfg, self.cut, self.scale)

    @ms.jit
    def forward(self, x):
        return self.dropout(x)


def _run(form, x, seed, p, salt):
    net = _Dropout(form, p, salt)
    ms.ops.assign(net.seed, Tensor(seed, ms.float32))
    grad = ms.jit(ms.value_and_grad(net, 0))
    ones = Tensor(np.ones_like(x))
    _, dx = grad(Tensor(x), ones)
    return net.forward(Tensor(x)).asnumpy(), dx.asnumpy()


@pytest.mark.parametrize("p, salt, seed", [(0.1, 1.7320508, 3.0), (0.25, 5 * 1.7320508, 1000002.0), (0.5, 0.0, 0.0)])
def test_lora_dropout_draws_one_mask_on_both_forms(p, salt, seed):
    """MindSpore's form computes HashDropout's splitmix64 mask with uint64 ops: for the same step
    seed and layer salt both forms keep the same elements and scale them alike (so a run on either
    draws the masks the definition says), and the gradient flows where the input was kept."""
    if not train_kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable() or kernels.training_unavailable()}")
    x = np.random.default_rng(1).normal(size=(2, 70, 300)).astype(np.float32)  # past the kernel's threading threshold
    y_ms, dx_ms = _run(MindSporeOps(), x, seed, p, salt)
    y_k, dx_k = _run(TrainingKernels(), x, seed, p, salt)
    keep = reference_keep(x.size, seed, salt, p).reshape(x.shape)
    np.testing.assert_array_equal(y_ms != 0, keep)
    np.testing.assert_array_equal(y_k != 0, keep)
    np.testing.assert_array_equal(y_ms, y_k)  # the same values, bit for bit
    np.testing.assert_array_equal(dx_ms, dx_k)
    np.testing.assert_array_equal(_run(MindSporeOps(), x, -1.0, p, salt)[0], x)  # seed < 0: off


def test_the_form_is_chosen_once_and_every_layer_uses_it():
    cfg = Config.from_name("tiny")
    form = training_ops()
    model = InternLMForCausalLM(cfg, ops=form)
    cells = [c for _, c in model.cells_and_names() if hasattr(c, "ops")]
    assert len(cells) > 10 and all(c.ops is form for c in cells)
    assert model.ops.name == ("cpu-training-kernels" if train_kernels.available() else "mindspore")
    # each form runs one layout, and packed weights are the serving kernels' only
    if kernels.library() is not None:
        with pytest.raises(ValueError, match="cpu-kernels form runs the fused model"):
            InternLMForCausalLM(cfg, ops=ServingKernels())
    if train_kernels.available():
        with pytest.raises(ValueError, match="cpu-training-kernels form runs the unfused model"):
            InternLMForCausalLM(cfg, ops=TrainingKernels(), fused=True)
    with pytest.raises(ValueError, match="the serving kernels' layout; this layer runs on mindspore"):
        Linear(32, 32, False).pack()

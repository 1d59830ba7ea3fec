"""optim.AdamW: AdamWeightDecay's update on grads * grad_scale, in place, against float64 numpy,
with the CPU kernels and with MindSpore's ops; a step with apply 0 changes nothing."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops

from internlm_core import kernels, train_kernels
from internlm_core.optim import AdamW

LRS = np.array([1e-2, 2e-2, 3e-2, 4e-2, 5e-2], np.float32)


class _Net(nn.Cell):
    def __init__(self, rng, n, k):
        super().__init__()
        self.w = Parameter(Tensor(rng.normal(size=(n, k)).astype(np.float32)), name="w")
        self.b = Parameter(Tensor(rng.normal(size=n).astype(np.float32)), name="b")

    def construct(self, x, loss_scale):
        return ((ops.matmul(x, self.w.T) + self.b) ** 2).mean() * loss_scale


class _Step(nn.Cell):
    def __init__(self, net, opt):
        super().__init__()
        self.opt, self.grad = opt, ms.value_and_grad(net, None, opt.parameters)

    @ms.jit
    def construct(self, x, loss_scale, clip, apply):
        loss, grads = self.grad(x, loss_scale)  # scaled, as the trainer's
        sq = self.opt.sum_squares(grads, loss_scale)
        return ops.depend(sq, self.opt(grads, loss_scale, clip, apply))


@pytest.mark.parametrize("n,k", [(64, 40), (400, 200)])  # the kernels' one-thread and threaded branches
@pytest.mark.parametrize("use_kernels", [True, False])
def test_adamw_steps_equal_numpy_and_skipped_steps_change_nothing(use_kernels, n, k, monkeypatch):
    if use_kernels and not train_kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable() or kernels.training_unavailable()}")
    if not use_kernels:
        monkeypatch.setattr(kernels, "library", lambda: None)
    rng = np.random.default_rng(0)
    net = _Net(rng, n, k)
    opt = AdamW([{"params": [net.w], "weight_decay": 0.1}, {"params": [net.b], "weight_decay": 0.0}], LRS,
                (0.9, 0.999), 1e-8)
    assert (opt.kernel is not None) == use_kernels
    assert [p.name for p in opt.moments1] == ["adam_m.w", "adam_m.b"]  # AdamWeightDecay's names: old checkpoints resume
    step = _Step(net, opt)
    x = rng.normal(size=(8, k)).astype(np.float32)
    w, b = net.w.asnumpy().astype(np.float64), net.b.asnumpy().astype(np.float64)
    m, v, done = [0.0, 0.0], [0.0, 0.0], 0
    # (apply, loss scale, clip); 2^100's gradients square past float32's range, 2^127's inverse is
    # a subnormal that flush-to-zero would make 0
    for apply, loss_scale, clip in ((1.0, 2.0, 0.5), (0.0, 2.0, 0.5), (1.0, 0.5, 1.0), (1.0, 2.0 ** 100, 0.25), (1.0, 2.0 ** 127, 1.0)):
        y = x @ w.T + b
        dy = 2 * y / y.size
        gw, gb = dy.T @ x, dy.sum(0)
        scaled = [Tensor(v, ms.float32) for v in (loss_scale, clip, apply)]
        sq = float(step(Tensor(x), *scaled))
        assert sq == pytest.approx((gw ** 2).sum() + (gb ** 2).sum(), rel=1e-5)  # unscaled
        if apply:
            for j, (p, g, wd) in enumerate(((w, gw, 0.1), (b, gb, 0.0))):
                g = g * clip
                m[j] = 0.9 * m[j] + 0.1 * g
                v[j] = 0.999 * v[j] + 0.001 * g * g
                p -= LRS[done] * (m[j] / (np.sqrt(v[j]) + 1e-8) + wd * p)
            done += 1
        # m / sqrt(v) of float32 moments: ~1e-4 of a step of size lr; at 80,000 weights a few whose
        # gradients are near zero (v tiny, m / sqrt(v) ill-conditioned) reach ~3e-3 of the 5e-2 step
        atol = 1e-5 if n * k < 10**4 else 3e-4
        np.testing.assert_allclose(net.w.asnumpy(), w, rtol=1e-5, atol=atol)
        np.testing.assert_allclose(net.b.asnumpy(), b, rtol=1e-5, atol=atol)
        assert opt.global_step.asnumpy().item() == done

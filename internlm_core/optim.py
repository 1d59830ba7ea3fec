"""AdamW with the gradients' loss-scale division and clip factor folded into the update, for the trainer.

    opt = AdamW(groups, lrs, betas, eps)       # groups: [{"params": [...], "weight_decay": wd}, ...]
    sq = opt.sum_squares(grads, loss_scale)    # sum((g / loss_scale)^2) over every gradient
    opt(grads, loss_scale, clip, apply)        # one step; apply 0 (an overflow) changes nothing

The update is ``nn.AdamWeightDecay``'s (no bias correction: the trainer folds it into ``lrs``, one
learning rate per step indexed by ``global_step``), on ``grads / loss_scale * clip``. The moments and
the step counter keep AdamWeightDecay's names (``adam_m.*``, ``adam_v.*``, ``global_step``), so
checkpoints written before this optimiser resume with it.

Why not ``nn.AdamWeightDecay`` itself: on CPU its kernel, the loss-scale division, the norm's
squares and the clip's multiplication each made a pass over every weight-sized tensor at ~4 GB/s
(bench-100m, full fine-tune: ~1.8 s of a 2.9 s step). With the CPU kernels (``kernels``) the norm
is one read of each gradient and the update one pass over weight, moments and gradient, in place.
Without them the same arithmetic runs as MindSpore ops (AdamWeightDecay's own kernel).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, mint, nn, ops

from . import train_kernels


class AdamW(nn.Cell):
    def __init__(self, groups: list[dict], lrs: np.ndarray, betas: tuple[float, float], eps: float,
                 kernels: bool | None = None):
        """``kernels``: step with the training kernels (the trainer passes its form's choice);
        None: where they are available."""
        super().__init__(auto_prefix=False)  # its Parameters keep their names inside the step cell
        params = [p for g in groups for p in g["params"]]
        self.decay = tuple(float(g["weight_decay"]) for g in groups for _ in g["params"])
        self.parameters = ParameterTuple(params)
        self.moments1 = self.parameters.clone(prefix="adam_m", init="zeros")
        self.moments2 = self.parameters.clone(prefix="adam_v", init="zeros")
        self.global_step = Parameter(Tensor([0], ms.int32), name="global_step", requires_grad=False)  # as theirs
        self.lrs = Tensor(np.asarray(lrs, np.float32))
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        kernels = train_kernels.available() if kernels is None else kernels
        self.kernel = train_kernels.adamw_op() if kernels else None
        self.squares = train_kernels.sum_squares_op() if self.kernel is not None else None
        self.fallback = ops.AdamWeightDecay()

    def sum_squares(self, grads, loss_scale):
        """sum((g / loss_scale)^2) over every gradient (loss_scale: a float32 scalar)."""
        total = ops.zeros((), ms.float32)
        for g in grads:
            if self.squares is not None:
                total = total + self.squares(g, loss_scale.reshape((1,))).reshape(())
            else:
                # in float32 (a half-precision square overflows early); mint.sum(g * g) because
                # ops.square + reduce_sum was ~60x slower on CPU (2.9)
                g = g.astype(ms.float32) / loss_scale
                total = total + mint.sum(g * g)
        return total

    def construct(self, grads, loss_scale, clip, apply):
        """One step on ``grads / loss_scale * clip`` when ``apply`` (float32 scalars; apply 1 or 0)."""
        lr = ops.gather(self.lrs, ops.minimum(self.global_step, self.lrs.shape[0] - 1), 0).reshape(())
        done = []
        if self.kernel is not None:
            for p, m, v, g, wd in zip(self.parameters, self.moments1, self.moments2, grads, self.decay):
                hyper = ops.stack([lr, Tensor(self.beta1, ms.float32), Tensor(self.beta2, ms.float32),
                                   Tensor(self.eps, ms.float32), Tensor(wd, ms.float32), loss_scale, clip, apply])
                done.append(self.kernel(p, m, v, g, hyper))  # in place
        elif apply > 0:
            for p, m, v, g, wd in zip(self.parameters, self.moments1, self.moments2, grads, self.decay):
                g = (g.astype(ms.float32) / loss_scale * clip).astype(p.dtype)  # the op wants the weight's dtype
                done.append(self.fallback(p, m, v, lr, self.beta1, self.beta2, self.eps, wd, g)[0])
        step = ops.assign_add(self.global_step, (apply > 0).astype(ms.int32).reshape((1,)))
        return ops.depend(step, done)

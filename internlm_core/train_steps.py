"""The compiled training steps: forward, loss, gradients, optional loss scaling, global-norm
clipping and the optimiser (``optim.AdamW``), each one ``ms.jit`` graph.

    steps = TrainStep(LossNet(model), opt, StepSettings.of(args, model, world))
    loss, grad_norm = steps.fused(ids, labels, cos, sin, mask)     # grad_accum == 1
    loss = steps.micro(...); ...; grad_norm = steps.apply()        # grad_accum > 1
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .data import IGNORE


@dataclass(frozen=True)
class StepSettings:
    """What the step graphs are compiled for (constants inside them)."""
    grad_accum: int
    grad_clip: float
    init_scale: float   # loss scale at the start (1.0: none)
    dynamic: bool       # halve on overflow (skipping that step), double after 1000 clean steps
    world: int          # data-parallel ranks whose gradients are averaged

    @classmethod
    def of(cls, args, model, world: int) -> "StepSettings":
        dynamic = args.loss_scale == "dynamic" or (args.loss_scale == "auto" and model.dtype == ms.float16)
        init_scale = 2.0 ** 16 if dynamic else (1.0 if args.loss_scale == "auto" else float(args.loss_scale))
        return cls(args.grad_accum, args.grad_clip, init_scale, dynamic, world)

    @property
    def scaled(self) -> bool:
        return self.dynamic or self.init_scale != 1.0


class LossNet(nn.Cell):
    """Mean token cross-entropy (labels IGNORE left out), times the loss scale. A subclass may
    change the logits the loss reads (``logits``), as the demo's compact vocabulary does
    (``demo.py``); ``finetune(..., loss_net=...)`` takes one."""

    def __init__(self, model):
        super().__init__()
        self.model, self.vocab = model, model.config.vocab_size
        # the model's form computes the loss too: on the training kernels one kernel that reads the
        # logits once forward and once backward (MindSpore's cross_entropy makes several passes and a
        # one-hot of the vocabulary)
        self.ops = model.ops

    def logits(self, ids, cos, sin, mask):
        return self.model(ids, cos, sin, mask).reshape(-1, self.vocab)  # (B*T, V) fp32

    def construct(self, ids, labels, cos, sin, mask, scale):
        return self.ops.cross_entropy(self.logits(ids, cos, sin, mask), labels.reshape(-1), IGNORE) * scale

    def eval_sums(self, ids, labels, cos, sin, mask):
        flat = labels.reshape(-1)
        total = ops.cross_entropy(self.logits(ids, cos, sin, mask), flat, ignore_index=IGNORE, reduction="sum")
        return total, (flat != IGNORE).astype(ms.float32).sum()


class TrainStep(nn.Cell):
    """``micro`` adds one micro-batch's gradients; ``apply`` clips and steps the optimiser.
    ``fused`` does both (grad_accum == 1); ``evaluate`` sums an eval batch's loss and tokens."""

    def __init__(self, loss_net: LossNet, opt, settings: StepSettings):
        super().__init__()
        self.loss_net, self.opt = loss_net, opt
        weights = opt.parameters
        self.grad_fn = ms.value_and_grad(loss_net, None, weights)
        self.reducer = nn.DistributedGradReducer(weights, mean=True, degree=settings.world) if settings.world > 1 \
            else None
        self.scale = Parameter(Tensor(settings.init_scale, ms.float32), name="trainer.loss_scale", requires_grad=False)
        self.good = Parameter(Tensor(0, ms.int32), name="trainer.good_steps", requires_grad=False)
        self.acc = weights.clone(prefix="trainer.grad_acc", init="zeros") if settings.grad_accum > 1 else None
        self.inv_accum = 1.0 / settings.grad_accum
        self.grad_clip, self.scaled, self.dynamic = settings.grad_clip, settings.scaled, settings.dynamic

    def _grads(self, ids, labels, cos, sin, mask):
        loss, grads = self.grad_fn(ids, labels, cos, sin, mask, self.scale)
        if self.reducer is not None:
            grads = self.reducer(grads)
        return loss / self.scale, grads

    def _apply(self, grads):
        # Unscaling and clipping are one factor that the optimiser applies as it reads each
        # gradient: no pass over the gradients but the one for their norm.
        norm = ops.sqrt(self.opt.sum_squares(grads, self.scale))
        factor = ops.minimum(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip > 0 else ops.ones((), ms.float32)
        finite = ops.isfinite(norm)
        apply = finite.astype(ms.float32) if self.scaled else ops.ones((), ms.float32)
        norm = ops.depend(norm, self.opt(grads, self.scale, factor, apply))
        if self.dynamic:  # grow x2 after 1000 clean steps, halve on overflow (skipping that step)
            if finite:
                ops.assign_add(self.good, Tensor(1, ms.int32))
                if self.good >= 1000:
                    ops.assign(self.scale, self.scale * 2.0)
                    ops.assign(self.good, Tensor(0, ms.int32))
            else:
                ops.assign(self.scale, ops.maximum(self.scale * 0.5, 1.0))
                ops.assign(self.good, Tensor(0, ms.int32))
        return norm

    @ms.jit
    def fused(self, ids, labels, cos, sin, mask):
        loss, grads = self._grads(ids, labels, cos, sin, mask)
        norm = self._apply(grads)
        return loss, norm

    @ms.jit
    def micro(self, ids, labels, cos, sin, mask):
        loss, grads = self._grads(ids, labels, cos, sin, mask)
        for a, g in zip(self.acc, grads):
            ops.assign_add(a, g * self.inv_accum)
        return loss

    @ms.jit
    def apply(self):
        norm = self._apply(tuple(self.acc))
        for a in self.acc:
            ops.assign(a, ops.zeros_like(a))
        return norm

    @ms.jit
    def evaluate(self, ids, labels, cos, sin, mask):
        return self.loss_net.eval_sums(ids, labels, cos, sin, mask)

    def state_params(self, model) -> dict:
        """Every Parameter whose value a resume must restore, by unique name: the trained weights,
        Adam's moments and step, the loss-scale state."""
        out = {p.name: p for p in model.trainable_params()}
        opt = self.opt
        for p in list(opt.moments1) + list(opt.moments2) + [opt.global_step, self.scale, self.good]:
            out[p.name] = p
        return out

"""Fine-tuning on MindSpore: full or LoRA, with exact resume, as setup -> fit -> save.

``finetune(args, work_dir, progress, cancel)`` trains the model folder ``args.model`` on a
MindRecord dataset (``internlm_core.data``) and writes ``args.out``: a full model folder, or an
adapter-only folder in LoRA mode (``merge_lora`` folds it into a full model). Beside the
weights it writes ``loss.png``, ``scalars.jsonl`` and a TensorBoard event file.

The training step is one compiled graph (``ms.jit``): forward, loss, gradients, optional loss
scaling, global-norm clipping and ``nn.AdamWeightDecay`` (which does train on CPU; several
``mint.optim`` optimisers silently do nothing there). The learning rate is warmup + cosine,
precomputed per step (with Adam's bias correction folded in, which AdamWeightDecay lacks) and
indexed by the optimiser's own ``global_step``.

Exact resume: every quantity that changes during training is either saved in a checkpoint
(weights being trained, Adam moments, ``global_step``, loss-scale state, loss history) or a
pure function of the step number (data order: one seeded permutation per epoch; dropout masks:
a hash of a per-step seed). Restarting from the checkpoint of step k therefore replays steps
k+1... exactly as the uninterrupted run did. Checkpoints live in ``work_dir/checkpoints/`` and
are written atomically; the last ``keep_last`` are kept. A cancel request is honoured between
steps: the state is checkpointed first, then ``Cancelled`` is raised.

Data parallel: started by ``msrun --worker_num=N ...`` (or any launcher that sets MindSpore's
cluster variables), ``finetune`` calls ``mindspore.communication.init()``, gives each rank its
slice of every global batch and averages gradients with ``nn.DistributedGradReducer``; rank 0
alone writes checkpoints and outputs. See ``data_parallel_context``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import Cancelled, SafetensorsFile, SafetensorsWriter, atomic_folder
from .data import IGNORE, load_rows
from .lora import AdapterSpec, parse_targets

CKPT_DIR = "checkpoints"
STATE_FILE = "state.safetensors"
TRAINER_FILE = "trainer.json"
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


# ---- arguments ------------------------------------------------------------------------------

@dataclass
class TrainArgs:
    """Everything a fine-tuning run needs. ``None`` for lr / weight_decay picks the seed's
    default for the mode (full 1e-5 / 0.1, LoRA 5e-5 / 0.01)."""
    model: str  # base model folder
    data: str  # dataset folder (or .mindrecord file) from internlm_core.data.preprocess
    out: str  # output folder: a full model, or an adapter in LoRA mode
    mode: str = "full"  # full | lora
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    max_steps: int = 0  # optimiser steps; 0 = from epochs
    epochs: float = 1.0
    batch_size: int = 1  # rows per micro-batch (per device in data parallel)
    grad_accum: int = 1  # micro-batches per optimiser step
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    eval_ratio: float = 0.0  # share of rows held out for evaluation
    eval_every: int = 0  # steps between evaluations (0 = only at the end, when there is an eval split)
    save_every: int = 500  # steps between checkpoints (0 = only on cancel)
    keep_last: int = 3
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "wq|wk|wv|wo"  # regex or comma list over wq wk wv wo w1 w2 w3
    dtype: str = "auto"  # compute dtype; auto = the model's (fp32 on CPU, whose half kernels are missing)
    loss_scale: float | str = "auto"  # auto (dynamic for float16), dynamic, or a fixed number (1 = off)
    overwrite: bool = False  # replace an existing output folder

    def resolved(self) -> "TrainArgs":
        lora = self.mode == "lora"
        return dataclasses.replace(
            self, lr=self.lr if self.lr is not None else (5e-5 if lora else 1e-5),
            weight_decay=self.weight_decay if self.weight_decay is not None else (0.01 if lora else 0.1),
            betas=tuple(self.betas))

    def validate(self) -> "TrainArgs":
        """Raise ValueError naming the first bad field; returns the resolved arguments."""
        a = self.resolved()

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("model", "data", "out"):
            need(isinstance(getattr(a, name), (str, os.PathLike)) and str(getattr(a, name)).strip() != "",
                 f"{name} must be a path")
        need(a.mode in ("full", "lora"), f"mode must be 'full' or 'lora', got {a.mode!r}")
        need(_num(a.lr) and 0 < a.lr < 1, f"lr must be in (0, 1), got {a.lr!r}")
        need(_num(a.weight_decay) and a.weight_decay >= 0, f"weight_decay must be >= 0, got {a.weight_decay!r}")
        need(len(a.betas) == 2 and all(_num(b) and 0 <= b < 1 for b in a.betas), f"betas must be two numbers in [0, 1), got {a.betas!r}")
        need(_num(a.eps) and a.eps > 0, f"eps must be > 0, got {a.eps!r}")
        need(_num(a.warmup_ratio) and 0 <= a.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {a.warmup_ratio!r}")
        need(_num(a.min_lr_ratio) and 0 <= a.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {a.min_lr_ratio!r}")
        need(_int(a.max_steps) and a.max_steps >= 0, f"max_steps must be an integer >= 0, got {a.max_steps!r}")
        need(_num(a.epochs) and (a.epochs > 0 or a.max_steps > 0), f"epochs must be > 0 (or set max_steps), got {a.epochs!r}")
        for name in ("batch_size", "grad_accum", "keep_last"):
            need(_int(getattr(a, name)) and getattr(a, name) >= 1, f"{name} must be an integer >= 1, got {getattr(a, name)!r}")
        for name in ("eval_every", "save_every", "seed"):
            need(_int(getattr(a, name)) and getattr(a, name) >= 0, f"{name} must be an integer >= 0, got {getattr(a, name)!r}")
        need(_num(a.grad_clip) and a.grad_clip >= 0, f"grad_clip must be >= 0, got {a.grad_clip!r}")
        need(_num(a.eval_ratio) and 0 <= a.eval_ratio < 0.5, f"eval_ratio must be in [0, 0.5), got {a.eval_ratio!r}")
        need(a.dtype in DTYPE_CHOICES, f"dtype must be one of {DTYPE_CHOICES}, got {a.dtype!r}")
        need(a.loss_scale in ("auto", "dynamic") or (_num(a.loss_scale) and a.loss_scale >= 1),
             f"loss_scale must be 'auto', 'dynamic' or a number >= 1, got {a.loss_scale!r}")
        if a.mode == "lora":
            need(_int(a.lora_rank) and a.lora_rank >= 1, f"lora_rank must be an integer >= 1, got {a.lora_rank!r}")
            need(_num(a.lora_alpha) and a.lora_alpha > 0, f"lora_alpha must be > 0, got {a.lora_alpha!r}")
            need(_num(a.lora_dropout) and 0 <= a.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {a.lora_dropout!r}")
            parse_targets(a.lora_targets)
        return a

    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(rank=self.lora_rank, alpha=float(self.lora_alpha), dropout=float(self.lora_dropout),
                           targets=parse_targets(self.lora_targets))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training arguments: {', '.join(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- schedule and data order (pure functions of the step) ----------------------------------------

def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_ratio: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to peak*min_ratio."""
    warmup = int(round(total * warmup_ratio))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(micro: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Row indices of global micro-batch ``micro``: the data stream is one seeded permutation
    per epoch laid end to end, so the position is the micro-batch number alone."""
    out = np.empty(batch, np.int64)
    for j in range(batch):
        g = micro * batch + j
        out[j] = epoch_order(n, g // n, seed)[g % n]
    return out


def split_eval(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): a seeded hold-out of ``ratio`` of the rows (at least one row each)."""
    order = np.random.default_rng([seed, 7919]).permutation(n)
    k = min(n - 1, max(1, int(round(n * ratio)))) if ratio > 0 and n > 1 else 0
    return np.sort(order[k:]), np.sort(order[:k])


# ---- data parallel ---------------------------------------------------------------------------

def data_parallel_context() -> tuple[int, int]:
    """(rank, world size). Initialises MindSpore communication when a launcher asked for it.

    ``msrun --worker_num=8 --local_worker_num=8 --master_port=8118 python -m services.cli finetune ...``
    sets MS_WORKER_NUM / MS_ROLE / MS_SCHED_HOST... for every worker; ``init()`` then joins the
    group (HCCL on Ascend, NCCL on GPU). Without those variables training runs on one device.
    """
    if int(os.environ.get("MS_WORKER_NUM", "1")) <= 1 and int(os.environ.get("RANK_SIZE", "1")) <= 1:
        return 0, 1
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    if not _COMM_READY:  # init() joins the cluster once per process
        init()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        _COMM_READY.append(True)
    return get_rank(), get_group_size()


_COMM_READY: list = []


# ---- the compiled steps ----------------------------------------------------------------------

def _build_cells(model, opt, args: TrainArgs, world: int, logit_bias):
    import mindspore as ms
    from mindspore import Parameter, Tensor, mint, nn, ops

    vocab = model.config.vocab_size
    bias = Tensor(np.asarray(logit_bias, np.float32)) if logit_bias is not None else None
    dynamic = args.loss_scale == "dynamic" or (args.loss_scale == "auto" and model.dtype == ms.float16)
    init_scale = 2.0 ** 16 if dynamic else (1.0 if args.loss_scale == "auto" else float(args.loss_scale))
    scaled = dynamic or init_scale != 1.0

    class LossNet(nn.Cell):
        def __init__(self):
            super().__init__()
            self.model = model

        def construct(self, ids, labels, cos, sin, mask, scale):
            logits = self.model(ids, cos, sin, mask).reshape(-1, vocab)  # (B*T, V) fp32
            if bias is not None:
                logits = logits + bias
            return ops.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE) * scale

        def eval_sums(self, ids, labels, cos, sin, mask):
            logits = self.model(ids, cos, sin, mask).reshape(-1, vocab)
            if bias is not None:
                logits = logits + bias
            flat = labels.reshape(-1)
            total = ops.cross_entropy(logits, flat, ignore_index=IGNORE, reduction="sum")
            return total, (flat != IGNORE).astype(ms.float32).sum()

    loss_net = LossNet()
    weights = opt.parameters
    reducer = nn.DistributedGradReducer(weights, mean=True, degree=world) if world > 1 else None

    class TrainStep(nn.Cell):
        """``micro`` adds one micro-batch's gradients; ``apply`` clips and steps the optimiser.
        ``fused`` does both (grad_accum == 1)."""

        def __init__(self):
            super().__init__()
            self.loss_net, self.opt = loss_net, opt
            self.grad_fn = ms.value_and_grad(loss_net, None, weights)
            self.scale = Parameter(Tensor(init_scale, ms.float32), name="trainer.loss_scale", requires_grad=False)
            self.good = Parameter(Tensor(0, ms.int32), name="trainer.good_steps", requires_grad=False)
            self.acc = weights.clone(prefix="trainer.grad_acc", init="zeros") if args.grad_accum > 1 else None
            self.inv_accum = 1.0 / args.grad_accum

        def _grads(self, ids, labels, cos, sin, mask):
            loss, grads = self.grad_fn(ids, labels, cos, sin, mask, self.scale)
            if reducer is not None:
                grads = reducer(grads)
            return loss / self.scale, grads

        def _apply(self, grads):
            inv = 1.0 / self.scale
            grads = tuple(g * inv for g in grads)
            sq = ops.zeros((), ms.float32)
            for g in grads:  # mint.sum(g * g): ops.square + reduce_sum was ~60x slower on CPU (2.9)
                g32 = g.astype(ms.float32)
                sq = sq + mint.sum(g32 * g32)
            norm = ops.sqrt(sq)
            if args.grad_clip > 0:
                factor = ops.minimum(1.0, args.grad_clip / (norm + 1e-6))
                grads = tuple(g * factor.astype(g.dtype) for g in grads)
            if not scaled:
                self.opt(grads)
                return norm
            finite = ops.isfinite(norm)
            if finite:
                self.opt(grads)
            if dynamic:  # grow x2 after 1000 clean steps, halve on overflow (skipping that step)
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

    return TrainStep()


# ---- checkpoints -----------------------------------------------------------------------------

def _state_params(step_cell, model, opt) -> dict:
    """Every Parameter whose value a resume must restore, by unique name."""
    out = {p.name: p for p in model.trainable_params()}
    for p in list(opt.moments1) + list(opt.moments2) + [opt.global_step, step_cell.scale, step_cell.good]:
        out[p.name] = p
    return out


def _save_checkpoint(work_dir: Path, step: int, params: dict, trainer: dict, keep_last: int) -> Path:
    ckpts = work_dir / CKPT_DIR
    dst = ckpts / f"step-{step:08d}"
    arrays = {n: p.asnumpy() for n, p in params.items()}
    st = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16"}
    with atomic_folder(dst, overwrite=True) as tmp:
        w = SafetensorsWriter(tmp / STATE_FILE, [(n, st[a.dtype], a.shape) for n, a in arrays.items()])
        for n, a in arrays.items():
            w.write(n, np.array(a, order="C"))
        w.close()
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer) + "\n")
    for old in sorted(p for p in ckpts.iterdir() if p.name.startswith("step-"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def latest_checkpoint(work_dir: Path) -> Path | None:
    ckpts = Path(work_dir) / CKPT_DIR
    if not ckpts.is_dir():
        return None
    done = sorted(p for p in ckpts.iterdir() if p.name.startswith("step-") and (p / TRAINER_FILE).is_file())
    return done[-1] if done else None


def _load_checkpoint(path: Path, params: dict) -> dict:
    from mindspore import Tensor

    f = SafetensorsFile(path / STATE_FILE)
    missing = sorted(set(params) - set(f.keys()))
    if missing:
        raise ValueError(f"checkpoint {path} does not match this run (missing {missing[:3]}); use a fresh work folder")
    for n, p in params.items():
        arr = np.array(f.get(n))
        if tuple(arr.shape) != tuple(p.shape):
            raise ValueError(f"checkpoint {path}: {n} has shape {list(arr.shape)}, the run needs {list(p.shape)}")
        p.set_data(Tensor(arr, p.dtype))
    return json.loads((path / TRAINER_FILE).read_text())


# ---- logs: JSONL, TensorBoard events, loss curve ------------------------------------------------

def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def _masked_crc(data: bytes) -> int:
    c = _crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


class EventWriter:
    """TensorBoard scalars without TensorFlow: TFRecord-framed ``Event`` protos, encoded by hand
    (wall_time=1 double, step=2 int64, file_version=3 string, summary=5 {value=1 {tag=1, simple_value=2}})."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{os.uname().nodename}.{os.getpid()}"
        self.f = open(self.path, "ab")
        self._write(_field(1, 1, struct.pack("<d", time.time())) + _field(3, 2, _varint(13) + b"brain.Event:2"))

    def _write(self, event: bytes) -> None:
        head = struct.pack("<Q", len(event))
        self.f.write(head + struct.pack("<I", _masked_crc(head)) + event + struct.pack("<I", _masked_crc(event)))

    def scalars(self, step: int, values: dict) -> None:
        summary = b""
        for tag, v in values.items():
            tag_b = tag.encode()
            val = _field(1, 2, _varint(len(tag_b)) + tag_b) + _field(2, 5, struct.pack("<f", float(v)))
            summary += _field(1, 2, _varint(len(val)) + val)
        self._write(_field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
                    + _field(5, 2, _varint(len(summary)) + summary))
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def plot_loss(history: list[dict], path: Path, title: str = "training loss") -> Path:
    """A small PNG of training loss (and eval loss points) against step, drawn with Pillow."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 400, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    train = [(r["step"], r["loss"]) for r in history if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    pts = train + evals
    d.text((m, 15), title, fill="black")
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)

        def xy(s, v):
            return m + (s - x0) / (x1 - x0) * (w - 2 * m), h - m - (v - y0) / (y1 - y0) * (h - 2 * m)

        d.rectangle([m, m, w - m, h - m], outline="gray")
        for k in range(5):
            v = y0 + (y1 - y0) * k / 4
            d.text((5, xy(x0, v)[1] - 6), f"{v:.3g}", fill="black")
        d.text((m, h - m + 8), f"step {x0}", fill="black")
        d.text((w - m - 60, h - m + 8), f"step {x1}", fill="black")
        if len(train) > 1:
            d.line([xy(s, v) for s, v in train], fill=(31, 119, 180), width=2)
        for s, v in evals:
            x, y = xy(s, v)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(214, 39, 40))
        d.text((w - m - 150, 15), "train (line), eval (dots)", fill="black")
    img.save(path)
    return path


# ---- the run ---------------------------------------------------------------------------------

class Trainer:
    """One fine-tuning run: ``Trainer(args, work_dir)`` sets up (model, data, optimiser, resume),
    ``fit()`` trains to the last step, ``save()`` publishes the output folder.

    ``finetune`` is the three in a row; tests use the parts to look inside (``model``, ``history``).
    """

    def __init__(self, args: TrainArgs, work_dir: str | Path, logit_bias: np.ndarray | None = None):
        import mindspore as ms
        from mindspore import Tensor, nn

        from .loader import load_model
        from .lora import inject_lora
        from .model import forward_inputs

        self.args = args = args.validate()
        self.work_dir, self.out = Path(work_dir), Path(args.out)
        if self.out.exists() and not args.overwrite:
            raise FileExistsError(f"output {self.out} already exists (set overwrite to replace it)")
        self.rank, self.world = data_parallel_context()

        self.ids, self.labels = load_rows(args.data)
        self.train_rows, self.eval_rows = split_eval(len(self.ids), args.eval_ratio, args.seed)
        self.n_train, self.seq = len(self.train_rows), self.ids.shape[1] - 1
        self.model = model = load_model(args.model, None if args.dtype == "auto" else args.dtype)
        cfg = self.config = model.config
        if self.seq > cfg.max_position_embeddings:
            raise ValueError(f"dataset rows of {self.seq} tokens exceed the model's {cfg.max_position_embeddings} positions")
        if self.ids.max() >= cfg.vocab_size:
            raise ValueError(f"dataset holds token id {int(self.ids.max())}, outside the model's vocabulary of {cfg.vocab_size}")
        if args.dtype in ("float16", "bfloat16") and ms.get_context("device_target") == "CPU":
            raise ValueError(f"{args.dtype} training needs a GPU or Ascend device; this is a CPU (use dtype auto/float32)")
        self.global_batch = args.batch_size * self.world
        steps_per_epoch = max(1, self.n_train // (self.global_batch * args.grad_accum))
        self.total = args.max_steps or max(1, int(math.ceil(args.epochs * steps_per_epoch)))
        self.tokens_per_step = self.global_batch * args.grad_accum * self.seq

        model.set_train(True)
        self.drop_seed = inject_lora(model, args.adapter_spec(), args.seed) if args.mode == "lora" else None
        trainable = model.trainable_params()
        groups = [{"params": [p for p in trainable if len(p.shape) >= 2], "weight_decay": args.weight_decay}]
        no_decay = [p for p in trainable if len(p.shape) < 2]  # norms and biases
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.lrs = np.array([lr_at(s, self.total, args.lr, args.warmup_ratio, args.min_lr_ratio)
                             for s in range(self.total)], np.float32)
        # nn.AdamWeightDecay has no bias correction (BERT-style): its first updates are up to ~6x
        # larger than AdamW's, which stalls small models. Fold the correction into the step size,
        # as Kingma & Ba's efficient form (and MindSpore's nn.Adam) do: lr_t * sqrt(1-b2^t) / (1-b1^t).
        t = np.arange(1, self.total + 1, dtype=np.float64)
        corrected = self.lrs * np.sqrt(1 - args.betas[1] ** t) / (1 - args.betas[0] ** t)
        self.opt = nn.AdamWeightDecay(groups, learning_rate=Tensor(corrected.astype(np.float32)), beta1=args.betas[0],
                                      beta2=args.betas[1], eps=args.eps)
        self.steps = _build_cells(model, self.opt, args, self.world, logit_bias)
        self.params = _state_params(self.steps, model, self.opt)
        self.fixed = forward_inputs(cfg, np.zeros((args.batch_size, self.seq), np.int32))[1:]  # cos, sin, mask

        self.step, self.history = 0, []
        ckpt = latest_checkpoint(self.work_dir)
        if ckpt is not None:
            trainer = _load_checkpoint(ckpt, self.params)
            if trainer.get("fingerprint") != _fingerprint(args, self.total):
                raise ValueError(f"{self.work_dir} holds a checkpoint of a different run (other data, model or "
                                 "settings); use a fresh work folder")
            self.step, self.history = trainer["step"], trainer["history"]

    # ---- pieces ----
    def _micro_batch(self, micro: int):
        from mindspore import Tensor

        rows = self.train_rows[batch_rows(micro, self.global_batch, self.n_train, self.args.seed)]
        rows = rows[self.rank * self.args.batch_size:(self.rank + 1) * self.args.batch_size]  # this rank's slice
        return Tensor(self.ids[rows, :-1]), Tensor(self.labels[rows, 1:])

    def _set_dropout_seed(self, value: float) -> None:
        import mindspore as ms
        from mindspore import Tensor, ops

        if self.drop_seed is not None:
            # In place: a compiled graph keeps reading the Parameter's memory; set_data would swap
            # in a new tensor that graphs compiled earlier never see.
            ops.assign(self.drop_seed, Tensor(value, ms.float32))

    def checkpoint(self) -> None:
        if self.rank == 0:
            trainer = {"step": self.step, "total": self.total, "micro_batches": self.step * self.args.grad_accum,
                       "epoch": self.step * self.args.grad_accum * self.global_batch / self.n_train,
                       "fingerprint": _fingerprint(self.args, self.total), "history": self.history}
            _save_checkpoint(self.work_dir, self.step, self.params, trainer, self.args.keep_last)

    def evaluate(self) -> float:
        """Mean loss per target token over the held-out rows (dropout off)."""
        from mindspore import Tensor

        self._set_dropout_seed(-1.0)
        bs, tot, cnt = self.args.batch_size, 0.0, 0.0
        for s in range(0, len(self.eval_rows), bs):
            rows = self.eval_rows[s:s + bs]
            ids = self.ids[np.resize(rows, bs), :-1]
            lab = self.labels[np.resize(rows, bs), 1:].copy()
            lab[len(rows):] = IGNORE  # filler rows keep the shape static and count for nothing
            a, b = self.steps.evaluate(Tensor(ids), Tensor(lab), *self.fixed)
            tot, cnt = tot + float(a), cnt + float(b)
        return tot / max(cnt, 1.0)

    def train_step(self) -> dict:
        """One optimiser step (grad_accum micro-batches); its record for the history."""
        step, args = self.step, self.args
        if args.grad_accum == 1:
            self._set_dropout_seed(float(step % 1000003))
            loss, norm = self.steps.fused(*self._micro_batch(step), *self.fixed)
            loss = float(loss)
        else:
            losses = []
            for k in range(args.grad_accum):
                micro = step * args.grad_accum + k
                self._set_dropout_seed(float(micro % 1000003))
                losses.append(float(self.steps.micro(*self._micro_batch(micro), *self.fixed)))
            norm = self.steps.apply()
            loss = float(np.mean(losses))
        self.step += 1
        return {"step": self.step, "loss": loss, "lr": float(self.lrs[step]), "grad_norm": float(norm)}

    # ---- the loop ----
    def fit(self, progress: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None) -> list[dict]:
        args, logs = self.args, self.work_dir / "logs"
        tb = EventWriter(logs) if self.rank == 0 else None
        times: list[float] = []
        try:
            while self.step < self.total:
                if cancel is not None and cancel():
                    self.checkpoint()
                    raise Cancelled(f"training cancelled at step {self.step} of {self.total} "
                                    "(checkpoint saved; run again to resume)")
                t0 = time.perf_counter()
                rec = self.train_step()
                times.append(time.perf_counter() - t0)
                done = self.step
                # Polled again before this step writes anything, for a caller whose claim on the
                # work folder lapsed during the step (a job that hung and was handed elsewhere):
                # its cancel() raises, and nothing more is written. A plain cancel is honoured at
                # the top of the loop, after this step's records are written and checkpointed.
                if cancel is not None:
                    cancel()
                if len(self.eval_rows) and ((args.eval_every and done % args.eval_every == 0) or done == self.total):
                    rec["eval_loss"] = self.evaluate()
                    rec["eval_ppl"] = math.exp(min(rec["eval_loss"], 50.0))
                self.history.append(rec)
                recent = times[-21:]
                step_time = float(np.mean(recent[1:] if len(recent) > 1 else recent))  # the first one compiles
                report = {**rec, "total": self.total, "tokens_per_s": self.tokens_per_step / step_time,
                          "eta_s": (self.total - done) * step_time,
                          "epoch": done * args.grad_accum * self.global_batch / self.n_train}
                if tb is not None:
                    tb.scalars(done, {k: v for k, v in report.items() if k not in ("step", "total")})
                    with open(logs / "scalars.jsonl", "a") as f:
                        f.write(json.dumps(report) + "\n")
                if progress is not None:
                    progress(report)
                if args.save_every and done % args.save_every == 0 and done < self.total:
                    self.checkpoint()
        finally:
            if tb is not None:
                tb.close()
        self.checkpoint()
        return self.history

    def save(self) -> Path:
        """Publish the output folder (model or adapter, with training.json, scalars.jsonl,
        loss.png and the TensorBoard events): staged in work_dir, then renamed into place."""
        from .loader import save_model
        from .lora import lora_state, save_adapter

        if self.rank != 0:
            return self.out
        args, stage = self.args, self.work_dir / "output"
        h = self.history
        summary = {"args": args.to_dict(), "steps": self.total, "base_model": str(args.model), "data": str(args.data),
                   "final_loss": h[-1]["loss"] if h else None,
                   "eval_loss": next((r["eval_loss"] for r in reversed(h) if "eval_loss" in r), None)}
        extra = {"training.json": json.dumps(summary, indent=2) + "\n",
                 "scalars.jsonl": "".join(json.dumps(r) + "\n" for r in h)}
        if args.mode == "lora":
            save_adapter(lora_state(self.model), args.adapter_spec(), self.config, stage, overwrite=True, extra_files=extra)
        else:
            save_model(self.model, self.config, stage, overwrite=True, tokenizer_from=Path(args.model), extra_files=extra)
        plot_loss(h, stage / "loss.png", f"{args.mode} fine-tune of {Path(args.model).name}")
        for ev in sorted((self.work_dir / "logs").glob("events.out.tfevents.*")):
            shutil.copyfile(ev, stage / ev.name)
        with atomic_folder(self.out, overwrite=True) as tmp:
            for f in stage.iterdir():
                shutil.move(str(f), tmp / f.name)
        shutil.rmtree(stage, ignore_errors=True)
        return self.out


def finetune(args: TrainArgs, work_dir: str | Path, progress: Callable[[dict], None] | None = None,
             cancel: Callable[[], bool] | None = None, logit_bias: np.ndarray | None = None) -> Path:
    """Train and write ``args.out``; resumes from the newest checkpoint in ``work_dir``.

    ``progress(dict)`` gets step, total, loss, lr, grad_norm, tokens_per_s, eta_s, epoch (and
    eval_loss / eval_ppl after an evaluation). ``cancel()`` is polled between steps (state is
    checkpointed, then ``Cancelled`` raised). A ``logit_bias`` (V,) is added to the logits in the
    loss (the demo model uses it to stand for vocabulary it does not train). Returns the output.
    """
    trainer = Trainer(args, work_dir, logit_bias)
    trainer.fit(progress, cancel)
    return trainer.save()


def _fingerprint(args: TrainArgs, total: int) -> str:
    """What must not change between a run and its resume (the output path and overwrite may)."""
    keep = {k: v for k, v in args.to_dict().items() if k not in ("out", "overwrite")}
    return f"{zlib.crc32(json.dumps(keep, sort_keys=True).encode()):08x}-{total}"

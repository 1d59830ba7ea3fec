"""Fine-tuning on MindSpore: full or LoRA, with exact resume, as setup -> fit -> save.

``finetune(args, work_dir, progress, cancel)`` trains the model folder ``args.model`` on a
MindRecord dataset (``internlm_core.data``) and writes ``args.out``: a full model folder, or an
adapter-only folder in LoRA mode (``merge_lora`` folds it into a full model). Beside the
weights it writes ``loss.png``, ``scalars.jsonl`` and a TensorBoard event file.

The parts: ``train_args.py`` (the arguments, free of MindSpore so that services can check a job
without loading it), ``schedule.py`` (learning rate, data order, eval hold-out: pure functions of
the step), ``train_steps.py`` (the compiled step graphs), ``train_state.py`` (checkpoints),
``train_logs.py`` (TensorBoard scalars, the loss plot); this module holds the run. The learning
rate is warmup + cosine, precomputed per step (with Adam's bias correction folded in, which
AdamWeightDecay lacks) and indexed by the optimiser's own ``global_step``.

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
import json
import math
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.communication import get_group_size, get_rank, init

from .checkpoint import Cancelled, atomic_folder, read_config
from .data import IGNORE, RowFile
from .forms import training_ops
from .loader import load_frozen_base, load_model, save_model
from .lora import inject_lora, lora_state, save_adapter
from .model import compute_dtype_for, forward_inputs
from .optim import AdamW
from .quantize import base_precision
from .schedule import batch_rows, lr_at, split_eval
from .train_args import TrainArgs
from .train_logs import LOSS_PLOT, SCALARS_FILE, ScalarWriter, plot_loss
from .train_state import latest_checkpoint, load_checkpoint, save_checkpoint
from .train_steps import LossNet, StepSettings, TrainStep

ROWS_FILE = "rows.npy"  # the work folder's copy of the dataset that batches are read from (data.RowFile)


# ---- data parallel ---------------------------------------------------------------------------

def data_parallel_context() -> tuple[int, int]:
    """(rank, world size). Initialises MindSpore communication when a launcher asked for it.

    ``msrun --worker_num=8 --local_worker_num=8 --master_port=8118 python -m services.cli finetune ...``
    sets MS_WORKER_NUM / MS_ROLE / MS_SCHED_HOST... for every worker; ``init()`` then joins the
    group (HCCL on Ascend, NCCL on GPU). Without those variables training runs on one device.
    """
    if int(os.environ.get("MS_WORKER_NUM", "1")) <= 1 and int(os.environ.get("RANK_SIZE", "1")) <= 1:
        return 0, 1
    if not _COMM_READY:  # init() joins the cluster once per process
        init()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        _COMM_READY.append(True)
    return get_rank(), get_group_size()


_COMM_READY: list = []


# ---- the run ---------------------------------------------------------------------------------

class Trainer:
    """One fine-tuning run: ``Trainer(args, work_dir)`` sets up (model, data, optimiser, resume),
    ``fit()`` trains to the last step, ``save()`` publishes the output folder.

    ``finetune`` is the three in a row; tests use the parts to look inside (``model``, ``history``).
    """

    def __init__(self, args: TrainArgs, work_dir: str | Path, loss_net: Callable[..., LossNet] = LossNet):
        # On CPU a training step is one graph whose result is waited for at once; MindSpore's
        # asynchronous launch pipeline spins a core while it waits (bench-100m LoRA step
        # 0.35 -> 0.27 s run on the calling thread). Read when a graph runs.
        if ms.get_context("device_target") == "CPU":
            os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")
        self.args = args = args.validate()
        self.work_dir, self.out = Path(work_dir), Path(args.out)
        if self.out.exists() and not args.overwrite:
            raise FileExistsError(f"output {self.out} already exists (set overwrite to replace it)")
        self.rank, self.world = data_parallel_context()

        # Each batch's rows are read when it runs, from a copy made here (MindRecord has no random
        # access); data-parallel ranks each write the same file, renamed into place whole.
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.row_file = RowFile.write(args.data, self.work_dir / ROWS_FILE)
        self.train_rows, self.eval_rows = split_eval(len(self.row_file), args.eval_ratio, args.seed)
        self.n_train, self.seq = len(self.train_rows), self.row_file.length - 1
        # "kernels or not" is decided here, once (``forms.training_ops`` logs which and why), and is
        # recorded in the run's checkpoints: the forms agree to float rounding only, so a resume on a
        # machine with the other form would not replay the same run
        base_cfg = read_config(Path(args.model))
        dtype = compute_dtype_for(base_cfg) if args.dtype == "auto" else args.dtype
        self.ops = training_ops(dtype)
        # LoRA's frozen base stays in its own precision (QLoRA-like: bf16 as stored, or int8), its
        # adapters and their optimiser state fp32; full fine-tuning trains fp32 master weights. The
        # precision is the run's: recorded and checked on resume like the form.
        self.base = base_precision(base_cfg, args.quantize_method)
        if args.mode == "lora" and self.base != "float32":
            self.model = model = load_frozen_base(args.model, self.ops, args.quantize_method, dtype)
        else:
            self.model = model = load_model(args.model, dtype, ops=self.ops)
        cfg = self.config = model.config
        if self.seq > cfg.max_position_embeddings:
            raise ValueError(f"dataset rows of {self.seq} tokens exceed the model's {cfg.max_position_embeddings} positions")
        max_id = self.row_file.max_id()
        if max_id >= cfg.vocab_size:
            raise ValueError(f"dataset holds token id {max_id}, outside the model's vocabulary of {cfg.vocab_size}")
        if args.dtype in ("float16", "bfloat16") and ms.get_context("device_target") == "CPU":
            raise ValueError(f"{args.dtype} training needs a GPU or Ascend device; this is a CPU (use dtype auto/float32)")
        self.global_batch = args.batch_size * self.world
        steps_per_epoch = max(1, self.n_train // (self.global_batch * args.grad_accum))
        self.total = args.max_steps or max(1, int(math.ceil(args.epochs * steps_per_epoch)))
        self.tokens_per_step = self.global_batch * args.grad_accum * self.seq

        model.set_train(True)
        self.drop_seed = inject_lora(model, args.adapter_spec(), args.seed) if args.mode == "lora" else None
        if args.recompute:
            # Each block's activations are recomputed in the backward pass instead of kept. After
            # every change to the blocks (LoRA's): recompute() marks the sub-cells present at the
            # call, once per cell. On MindSpore 2.9's CPU backend it measured more memory, not less
            # (6 layers 512 wide at batch 2 x 256, peak RSS: LoRA 1.77 -> 1.85 GB, full 2.01 -> 2.20
            # GB, full at half the tokens/s): hence off by default.
            for layer in model.model.layers:
                layer.recompute()
        trainable = model.trainable_params()
        groups = [{"params": [p for p in trainable if len(p.shape) >= 2], "weight_decay": args.weight_decay}]
        no_decay = [p for p in trainable if len(p.shape) < 2]  # norms and biases
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.lrs = np.array([lr_at(s, self.total, args.lr, args.warmup_ratio, args.min_lr_ratio)
                             for s in range(self.total)], np.float32)
        # AdamWeightDecay's update (optim.AdamW) has no bias correction (BERT-style): its first
        # updates are up to ~6x larger than AdamW's, which stalls small models. Fold the correction
        # into the step size, as Kingma & Ba's efficient form (and MindSpore's nn.Adam) do:
        # lr_t * sqrt(1-b2^t) / (1-b1^t).
        t = np.arange(1, self.total + 1, dtype=np.float64)
        corrected = self.lrs * np.sqrt(1 - args.betas[1] ** t) / (1 - args.betas[0] ** t)
        self.opt = AdamW(groups, corrected.astype(np.float32), args.betas, args.eps, kernels=self.ops.cpu_kernels)
        self.steps = TrainStep(loss_net(model), self.opt, StepSettings.of(args, model, self.world))
        self.params = self.steps.state_params(model)
        self.fixed = forward_inputs(cfg, np.zeros((args.batch_size, self.seq), np.int32))[1:]  # cos, sin, mask

        self.step, self.history = 0, []
        ckpt = latest_checkpoint(self.work_dir)
        if ckpt is not None:
            trainer = load_checkpoint(ckpt, self.params)
            self._check_same_run(trainer)
            self.step, self.history = trainer["step"], trainer["history"]

    def _check_same_run(self, trainer: dict) -> None:
        """Refuse a checkpoint of another run (ValueError naming what differs). A checkpoint written
        before the form and the base precision were recorded implies the values its run had: the form
        this machine picks (the code then chose it by the rule ``training_ops`` follows: the training
        kernels at float32 compute where they are built, else MindSpore's ops; on MindSpore's ops its
        LoRA dropout drew another mask than today's, the kernels' the same) and a base held in float32
        (that code held every weight so; full fine-tuning still trains float32 weights, whatever the
        folder's precision)."""
        args = self.args
        form = trainer.get("form", self.ops.name)
        if form != self.ops.name:
            raise ValueError(f"{self.work_dir} holds a checkpoint of a run trained on {form}, and this "
                             f"machine trains on {self.ops.name}: resuming would not replay the same run (the "
                             "forms agree to float rounding only); resume where it ran, or use a fresh work folder")
        base = trainer.get("base", "float32" if args.mode == "lora" else self.base)
        if base != self.base:
            raise ValueError(f"{self.work_dir} holds a checkpoint of a run whose base precision was "
                             f"{base}, and this run's is {self.base} (quantize {args.quantize}): "
                             "resuming would not replay the same run; resume with the same base and quantize, "
                             "or use a fresh work folder")
        if not _same_run(trainer.get("fingerprint", ""), args, self.total):
            # an argument added since, at another value than the checkpoint's run had: named
            changed = [f"{name} {getattr(args, name)!r}, where its run had {old!r}"
                       for name, old in ADDED_ARGS.items()
                       if _same_run(trainer.get("fingerprint", ""), dataclasses.replace(args, **{name: old}), self.total)]
            raise ValueError(f"{self.work_dir} holds a checkpoint of a different run "
                             f"({', '.join(changed) or 'other data, model or settings'}); use a fresh work folder")

    # ---- pieces ----
    def _micro_batch(self, micro: int):
        rows = self.train_rows[batch_rows(micro, self.global_batch, self.n_train, self.args.seed)]
        rows = rows[self.rank * self.args.batch_size:(self.rank + 1) * self.args.batch_size]  # this rank's slice
        ids, labels = self.row_file[rows]
        return Tensor(ids[:, :-1]), Tensor(labels[:, 1:])

    def _set_dropout_seed(self, value: float) -> None:
        if self.drop_seed is not None:
            # In place: a compiled graph keeps reading the Parameter's memory; set_data would swap
            # in a new tensor that graphs compiled earlier never see.
            ops.assign(self.drop_seed, Tensor(value, ms.float32))

    def checkpoint(self) -> None:
        if self.rank == 0:
            trainer = {"step": self.step, "total": self.total, "micro_batches": self.step * self.args.grad_accum,
                       "epoch": self.step * self.args.grad_accum * self.global_batch / self.n_train,
                       "fingerprint": _fingerprint(self.args, self.total),
                       "form": self.ops.name, "base": self.base,
                       "history": self.history}
            save_checkpoint(self.work_dir, self.step, self.params, trainer, self.args.keep_last)

    def evaluate(self) -> float:
        """Mean loss per target token over the held-out rows (dropout off)."""
        self._set_dropout_seed(-1.0)
        bs, tot, cnt = self.args.batch_size, 0.0, 0.0
        for s in range(0, len(self.eval_rows), bs):
            rows = self.eval_rows[s:s + bs]
            ids, labels = self.row_file[np.resize(rows, bs)]
            labels[len(rows):] = IGNORE  # filler rows keep the shape static and count for nothing
            a, b = self.steps.evaluate(Tensor(ids[:, :-1]), Tensor(labels[:, 1:]), *self.fixed)
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
        tb = ScalarWriter(logs) if self.rank == 0 else None
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
                    with open(logs / SCALARS_FILE, "a") as f:
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
        if self.rank != 0:
            return self.out
        args, stage = self.args, self.work_dir / "output"
        h = self.history
        summary = {"args": args.to_dict(), "steps": self.total, "base_model": str(args.model),
                   "base_precision": self.base, "form": self.ops.name, "data": str(args.data),
                   "final_loss": h[-1]["loss"] if h else None,
                   "eval_loss": next((r["eval_loss"] for r in reversed(h) if "eval_loss" in r), None)}
        extra = {"training.json": json.dumps(summary, indent=2) + "\n",
                 SCALARS_FILE: "".join(json.dumps(r) + "\n" for r in h)}
        if args.mode == "lora":
            save_adapter(lora_state(self.model), args.adapter_spec(), self.config, stage, overwrite=True, extra_files=extra)
        else:
            save_model(self.model, self.config, stage, overwrite=True, tokenizer_from=Path(args.model), extra_files=extra)
        plot_loss(h, stage / LOSS_PLOT, f"{args.mode} fine-tune of {Path(args.model).name}")
        for ev in sorted((self.work_dir / "logs").glob("events.out.tfevents.*")):
            shutil.copyfile(ev, stage / ev.name)
        with atomic_folder(self.out, overwrite=True) as tmp:
            for f in stage.iterdir():
                shutil.move(str(f), tmp / f.name)
        shutil.rmtree(stage, ignore_errors=True)
        return self.out


def finetune(args: TrainArgs, work_dir: str | Path, progress: Callable[[dict], None] | None = None,
             cancel: Callable[[], bool] | None = None, loss_net: Callable[..., LossNet] = LossNet) -> Path:
    """Train and write ``args.out``; resumes from the newest checkpoint in ``work_dir``.

    ``progress(dict)`` gets step, total, loss, lr, grad_norm, tokens_per_s, eta_s, epoch (and
    eval_loss / eval_ppl after an evaluation). ``cancel()`` is polled between steps (state is
    checkpointed, then ``Cancelled`` raised). ``loss_net(model)`` builds the loss (a ``LossNet``,
    or a subclass of it: the demo's). Returns the output.
    """
    trainer = Trainer(args, work_dir, loss_net)
    trainer.fit(progress, cancel)
    return trainer.save()


# TrainArgs fields added after checkpoints were written without them, in the order they were
# added, each with the value every run before it had: such a field enters the fingerprint only at
# another value, so a checkpoint written before it existed still resumes (and a run changing it is
# refused, by name). A field added later goes at the end, with the value runs had without it.
ADDED_ARGS = {"recompute": False, "quantize": "none"}


def _fingerprint(args: TrainArgs, total: int, always: int = 0) -> str:
    """What must not change between a run and its resume (the output path and overwrite may): the
    arguments and the steps. ``always``: how many of ADDED_ARGS enter whatever their value, as the
    code before this rule wrote them (it knew the first ``always`` of them). The execution form and
    the base precision are recorded beside it and checked by name."""
    optional = list(ADDED_ARGS)[always:]
    keep = {k: v for k, v in args.to_dict().items()
            if k not in ("out", "overwrite") and not (k in optional and v == ADDED_ARGS[k])}
    return f"{zlib.crc32(json.dumps(keep, sort_keys=True).encode()):08x}-{total}"


def _same_run(fingerprint: str, args: TrainArgs, total: int) -> bool:
    """Whether a checkpoint's fingerprint is this run's, written by this code or by the code before
    each field of ADDED_ARGS (which knew fewer of them and wrote them all); its "-form" or
    "-base-form" tail, which the code between wrote, is checked apart, by name."""
    written = "-".join(fingerprint.split("-", 2)[:2])
    return any(written == _fingerprint(args, total, n) for n in range(len(ADDED_ARGS) + 1))
"""What a fine-tuning run leaves to look at: TensorBoard scalars (written by tensorboardX) and a
PNG of the loss curve (matplotlib); ``scalars.jsonl`` is written by the trainer itself."""
from __future__ import annotations

import math
from pathlib import Path

SCALARS_FILE = "scalars.jsonl"  # one JSON object a step, written by the trainer
LOSS_PLOT = "loss.png"


class ScalarWriter:
    """TensorBoard scalars under ``folder`` (an ``events.out.tfevents.*`` file)."""

    def __init__(self, folder: Path):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._writer = _summary_writer_class()(str(folder), flush_secs=5)

    def scalars(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter. tensorboardX imports torch where it is installed, only to take
    torch tensors as values (measured: +215 MB of peak RSS in a training process that writes floats);
    unless torch is already loaded, it is imported with torch hidden (``import torch`` then fails,
    which tensorboardX allows), and torch stays importable afterwards."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # an ImportError for ``import torch``, by Python's import rules
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def plot_loss(history: list[dict], path: Path, title: str = "training loss") -> Path:
    """A 640 x 400 PNG of training loss (line) and eval loss (points) against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in history if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o", label="eval", color="tab:red")
    ax.set(title=title, xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)

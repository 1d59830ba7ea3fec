"""Training data: Alpaca JSON and WikiText text to MindRecord rows, and reading them back.

A dataset is a folder: ``data.mindrecord`` (+ its ``.db`` index) with MindFormers' research/internlm schema,
``input_ids`` int32 [-1] and, for Alpaca, ``labels`` int32 [-1], every row ``seq_length + 1``
long and right-padded, plus ``stats.json``. The folder is written to a temporary sibling and
renamed when complete, so a reader never sees half a dataset. Training reads it a batch at a
time (``RowFile``), never whole.

What differs from MindFormers' research/internlm preprocessing scripts and why:
- ``<eoh>``/``<eoa>`` are the real pieces 103027/103028 (those scripts hard-code the unused ids 103166/103167).
- The prompt is tokenized exactly as the serving chat template renders it
  (``Tokenizer.encode_chat``), so training and inference see the same tokens.
- A record that overflows is truncated: the answer's tail first, then the middle of the user
  text, always keeping the ``<eoh>\\n<|Bot|>:`` turn marker and at least a few answer tokens.
  A record that still cannot fit is dropped and counted; no row ever has all labels ignored.
- Alpaca text is encoded as plain text, as serving encodes user text: a literal ``<eoa>`` in an
  answer is characters, not an early end of the answer. WikiText keeps those scripts' tokenizer
  behaviour, literal special strings to ids: its ``<unk>`` marks out-of-vocabulary words.
- WikiText is packed into full rows by default (no padding wasted); their
  one-line-per-sample mode (min length, pad with 2) stays available as ``mode="line"``.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .checkpoint import Cancelled, atomic_folder
from .errors import DataError
from .tokenizer import EOS, Tokenizer

IGNORE = -100  # label value the loss skips
PAD_ID = EOS  # InternLM pads with </s>
DATA_FILE = "data.mindrecord"
STATS_FILE = "stats.json"
MIN_ANSWER = 4  # a truncated Alpaca row keeps at least this many answer tokens
WIKI_MIN_LENGTH = 50  # MindFormers' min_length for one-line samples

SCHEMAS = {
    "alpaca": {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}},
    "wikitext": {"input_ids": {"type": "int32", "shape": [-1]}},
}
MODES = {"alpaca": ("pad",), "wikitext": ("pack", "line")}


# ---- Alpaca ---------------------------------------------------------------------------------

def alpaca_user_text(rec: dict) -> str:
    """The user turn's text: instruction, then the input on its own line when there is one."""
    return rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")


def alpaca_tokens(tok: Tokenizer, rec: dict) -> tuple[list[int], list[int]]:
    """(prompt ids with bos, answer ids) in the tokenizer's chat format: v1's prompt
    ``<|User|>:{user}<eoh>\\n<|Bot|>:`` and answer ``{output}<eoa>\\n``, InternLM2's
    ``<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n`` and ``{output}<|im_end|>\\n``;
    then eos."""
    prompt = tok.encode_chat([{"role": "user", "content": alpaca_user_text(rec)}])
    answer = tok.encode(rec["output"], bos=False) + tok.answer_end() + [EOS]
    return prompt, answer


def _prompt_tail_length(tok: Tokenizer) -> int:
    """Tokens at the end of every prompt that must survive truncation (v1: ``<eoh>\\n<|Bot|>:``)."""
    return len(tok.prompt_tail())


def alpaca_row(prompt: list[int], answer: list[int], row_len: int, tail: int) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) of length ``row_len``, or None if it cannot fit sensibly.

    Labels equal the ids on answer tokens and IGNORE on the prompt and padding; the loss shifts
    them (targets = labels[1:]).
    """
    truncated = len(prompt) + len(answer) > row_len
    if truncated:
        keep_answer = max(MIN_ANSWER, row_len - len(prompt))
        answer = answer[:keep_answer]
        room = row_len - len(answer)  # what is left for the prompt
        if room < len(prompt):
            head = room - tail  # bos + the start of the user text, then the turn marker
            if head < 2:
                return None
            prompt = prompt[:head] + prompt[-tail:]
    ids = prompt + answer
    labels = [IGNORE] * len(prompt) + answer
    pad = row_len - len(ids)
    return ids + [PAD_ID] * pad, labels + [IGNORE] * pad, truncated


def read_alpaca(src: Path) -> list[dict]:
    try:
        records = json.loads(Path(src).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {src}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{src} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{src}: expected a JSON array of {{instruction, input, output}} records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str) \
                or not isinstance(r.get("input", ""), str):
            raise DataError(f"{src}: record {i} needs string fields instruction, output (and optional input)")
    return records


# ---- WikiText -------------------------------------------------------------------------------

def read_lines(src: Path) -> list[str]:
    try:
        text = Path(src).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {src}: {e}") from None
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def line_row(ids: list[int], row_len: int, min_length: int = WIKI_MIN_LENGTH) -> tuple[list[int], bool] | None:
    """MindFormers' one-line sample: kept if at least ``min_length`` tokens, cut or padded with 2."""
    if len(ids) < min_length:
        return None
    return (ids + [PAD_ID] * (row_len - len(ids)))[:row_len], len(ids) > row_len


def pack_rows(streams, row_len: int):
    """Concatenate token lists and cut them into full rows; the last partial row is padded.

    Yields (row, n_real_tokens)."""
    buf: list[int] = []
    for ids in streams:
        buf.extend(ids)
        while len(buf) >= row_len:
            yield buf[:row_len], row_len
            buf = buf[row_len:]
    if len(buf) > 1:  # a single token gives no target
        yield buf + [PAD_ID] * (row_len - len(buf)), len(buf)


# ---- the one entry point --------------------------------------------------------------------

def preprocess(kind: str, src: Path, dst: Path, seq_length: int, mode: str | None = None, tokenizer: Tokenizer | None = None,
               progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
               overwrite: bool = False, min_length: int = WIKI_MIN_LENGTH) -> dict:
    """Write a MindRecord dataset folder ``dst`` from ``src``; returns the statistics.

    kind "alpaca" (mode "pad") or "wikitext" (mode "pack", the default, or MindFormers' "line").
    ``progress(done, total)`` counts input records/lines; ``cancel()`` is checked between them
    and raises ``Cancelled`` (nothing is left behind). Stats: rows, tokens (real, non-padding),
    truncated, dropped, plus the input count and settings.
    """
    if kind not in MODES:
        raise DataError(f"kind must be one of {sorted(MODES)}, got {kind!r}")
    mode = mode or MODES[kind][0]
    if mode not in MODES[kind]:
        raise DataError(f"mode for {kind} must be one of {MODES[kind]}, got {mode!r}")
    if not isinstance(seq_length, int) or seq_length < 8:
        raise DataError(f"seq_length must be an integer >= 8, got {seq_length!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise DataError(f"source file not found: {src}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists")
    tok = tokenizer or Tokenizer()
    row_len = seq_length + 1
    items = read_alpaca(src) if kind == "alpaca" else read_lines(src)
    total = len(items)
    stats = {"kind": kind, "mode": mode, "seq_length": seq_length, "inputs": total,
             "rows": 0, "tokens": 0, "truncated": 0, "dropped": 0}
    rows: list[dict] = []

    def tick(i: int) -> None:
        if cancel is not None and cancel():
            raise Cancelled("preprocessing cancelled")
        if progress is not None and (i % 100 == 0 or i == total):
            progress(i, total)

    if kind == "alpaca":
        tail = _prompt_tail_length(tok)
        for i, rec in enumerate(items, 1):
            tick(i)
            row = alpaca_row(*alpaca_tokens(tok, rec), row_len, tail)
            if row is None:
                stats["dropped"] += 1
                continue
            ids, labels, truncated = row
            stats["truncated"] += truncated
            stats["tokens"] += _real_length(labels)
            rows.append({"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)})
    elif mode == "line":
        for i, line in enumerate(items, 1):
            tick(i)
            line_ids = tok.encode(line, allow_special=True)
            row = line_row(line_ids, row_len, min_length)
            if row is None:
                stats["dropped"] += 1
                continue
            ids, truncated = row
            stats["truncated"] += truncated
            stats["tokens"] += min(row_len, len(line_ids))
            rows.append({"input_ids": np.asarray(ids, np.int32)})
    else:
        def streams():
            for i, line in enumerate(items, 1):
                tick(i)
                # bos starts every paragraph/heading; no eos (as MindFormers' scripts)
                yield tok.encode(line, allow_special=True)
        for ids, n in pack_rows(streams(), row_len):
            stats["tokens"] += n
            rows.append({"input_ids": np.asarray(ids, np.int32)})
    stats["rows"] = len(rows)
    if not rows:
        raise DataError(f"{src}: no training rows (all {total} inputs were dropped)")
    write_dataset(dst, rows, kind, stats, overwrite)
    return stats


def _real_length(labels: list[int]) -> int:
    """Non-padding tokens of an Alpaca row: up to its last trained label."""
    last = max(i for i, x in enumerate(labels) if x != IGNORE)
    return last + 1


def write_dataset(dst: Path, rows: list[dict], kind: str, stats: dict, overwrite: bool = False) -> Path:
    from mindspore.mindrecord import FileWriter

    with atomic_folder(dst, overwrite) as tmp:
        writer = FileWriter(str(tmp / DATA_FILE), shard_num=1, overwrite=True)
        writer.add_schema(SCHEMAS[kind], f"internlm {kind}")
        for start in range(0, len(rows), 1000):
            writer.write_raw_data(rows[start:start + 1000])
        writer.commit()
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return dst


def data_file(path: Path) -> Path:
    """The MindRecord file of a dataset folder (or the file itself)."""
    path = Path(path)
    f = path / DATA_FILE if path.is_dir() else path
    if not f.is_file():
        raise DataError(f"no MindRecord dataset at {path}")
    return f


def iter_rows(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A dataset's rows in order, one at a time, as (input_ids, labels) int32 (L,); labels IGNORE
    where not trained.

    WikiText rows have no labels: every token is a target except padding (id 2, as MindFormers' scripts pad).
    Rows must all have one length (this module writes them so).
    """
    from mindspore.mindrecord import FileReader

    f = data_file(path)
    reader = FileReader(str(f), num_consumer=1)
    try:
        length = None
        for rec in reader.get_next():
            ids = rec["input_ids"].astype(np.int32)
            labels = (rec["labels"] if "labels" in rec else np.where(ids == PAD_ID, IGNORE, ids)).astype(np.int32)
            length = len(ids) if length is None else length
            if len(ids) != length or len(labels) != length:
                raise DataError(f"{f}: rows have different lengths; re-run preprocess")
            yield ids, labels
        if length is None:
            raise DataError(f"{f}: the dataset is empty")
    finally:
        reader.close()


def load_rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a dataset in memory as (input_ids, labels) int32 (N, L), to look at one;
    training reads its rows on demand instead (``RowFile``)."""
    ids, labels = zip(*iter_rows(path))
    return np.stack(ids), np.stack(labels)


class RowFile:
    """A dataset's rows as one int32 ``.npy`` file of shape (N, 2, L), [input_ids, labels] per
    row, read by row index: a trainer holds the rows of its batch, never the dataset.

    Why a copy: the batches are a seeded permutation of the rows, and MindRecord gives Python no
    random access (FileReader and MindDataset read in order; ShardReader's read by id is C++
    only). ``RowFile.write`` makes the copy in one streaming pass; ``rows[idx]`` then reads each
    asked row with one positioned read (not a memory map, whose pages would stay resident).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            (self.n, _, self.length), _, _ = read_header(f)
            self.offset = f.tell()
        self.row_bytes = 2 * self.length * 4

    @classmethod
    def write(cls, dataset: Path, dst: Path) -> "RowFile":
        """Copy dataset ``dataset`` to ``dst``, a row at a time (a temporary sibling renamed into
        place, so a reader never sees half of one)."""
        dst = Path(dst)
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as out:
                n = 0
                for ids, labels in iter_rows(dataset):
                    if n == 0:  # the row count is known at the end; numpy's header leaves room for it
                        header = {"descr": "<i4", "fortran_order": False, "shape": (0, 2, len(ids))}
                        np.lib.format.write_array_header_1_0(out, header)
                        offset = out.tell()
                    out.write(ids.astype("<i4").tobytes() + labels.astype("<i4").tobytes())
                    n += 1
                out.seek(0)
                np.lib.format.write_array_header_1_0(out, {**header, "shape": (n, 2, len(ids))})
                if out.tell() != offset:
                    raise RuntimeError("numpy's .npy header changed length with the row count")
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(dst)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) int32 (len(rows), L) of these row indices, read from the file now."""
        out = np.empty((len(rows), 2, self.length), np.int32)
        with open(self.path, "rb") as f:
            for k, r in enumerate(rows):
                if not 0 <= r < self.n:
                    raise IndexError(f"row {r} of {self.n}")
                f.seek(self.offset + int(r) * self.row_bytes)
                if f.readinto(out[k]) != self.row_bytes:
                    raise DataError(f"{self.path} is shorter than its {self.n} rows")
        return out[:, 0], out[:, 1]

    def max_id(self, chunk: int = 4096) -> int:
        """The largest token id, read ``chunk`` rows at a time."""
        top = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, self.n, chunk):
                rows = np.fromfile(f, "<i4", min(chunk, self.n - start) * 2 * self.length)
                top = max(top, int(rows.reshape(-1, 2, self.length)[:, 0].max()))
        return top

"""Preprocessing to MindRecord: exact Alpaca masks, truncation, WikiText packing and line modes."""
import json

import numpy as np
import pytest

from internlm_core.checkpoint import Cancelled
from internlm_core.data import (IGNORE, MIN_ANSWER, PAD_ID, DataError, RowFile, _prompt_tail_length, alpaca_row,
                                alpaca_tokens, load_rows, preprocess, write_dataset)
from internlm_core.tokenizer import EOA, EOH
from tests.helpers import DATA

ALPACA_EN = DATA / "alpaca" / "alpaca_en.json"
ALPACA_ZH = DATA / "alpaca" / "alpaca_zh.json"
WIKI = DATA / "wikitext-2" / "valid.txt"

# <|User|>:你好<eoh>\n<|Bot|>: without bos (InternLM v1's chat format)
PROMPT_NIHAO = [333, 352, 1621, 352, 27232, 76379, 103027, 364, 333, 352, 23845, 352, 27232]


def test_hand_computed_record(tokenizer):
    prompt, answer = alpaca_tokens(tokenizer, {"instruction": "你好", "input": "", "output": "Hello world"})
    assert prompt == [1] + PROMPT_NIHAO
    assert answer == [9843, 2028, EOA, 364, 2]  # 'Hello world' <eoa> \n </s>
    ids, labels, truncated = alpaca_row(prompt, answer, 24, _prompt_tail_length(tokenizer))
    assert not truncated
    assert ids == [1] + PROMPT_NIHAO + [9843, 2028, 103028, 364, 2] + [2] * 5
    assert labels == [IGNORE] * 14 + [9843, 2028, 103028, 364, 2] + [IGNORE] * 5


def test_record_with_input_puts_it_on_its_own_line(tokenizer):
    rec = {"instruction": "Translate", "input": "你好", "output": "Hi"}
    prompt, answer = alpaca_tokens(tokenizer, rec)
    assert prompt == tokenizer.encode("<|User|>:Translate\n你好<eoh>\n<|Bot|>:", allow_special=True)
    assert prompt[-7:] == [EOH, 364, 333, 352, 23845, 352, 27232]  # <eoh>\n<|Bot|>: ends every prompt


def test_typed_control_strings_in_records_are_text(tokenizer):
    rec = {"instruction": "Say <eoh> and <eoa>", "input": "</s>", "output": "Done<eoa> not yet</s>"}
    prompt, answer = alpaca_tokens(tokenizer, rec)
    assert prompt.count(EOH) == 1 and prompt[-7] == EOH  # only the template's turn marker
    assert answer.count(EOA) == 1 and answer[-3:] == [EOA, 364, 2]  # the answer ends once, at its end
    assert tokenizer.decode(answer[:-3]) == "Done<eoa> not yet</s>"


def test_exact_fit_is_trained_not_masked(tokenizer):
    prompt, answer = alpaca_tokens(tokenizer, {"instruction": "你好", "input": "", "output": "Hello world"})
    n = len(prompt) + len(answer)
    ids, labels, truncated = alpaca_row(prompt, answer, n, _prompt_tail_length(tokenizer))
    assert not truncated and len(ids) == n and PAD_ID not in ids[:-1]
    assert labels[-5:] == answer  # MindFormers' script masked this whole row


def test_overflowing_answer_is_cut_keeping_the_prompt(tokenizer):
    prompt, answer = alpaca_tokens(tokenizer, {"instruction": "你好", "input": "", "output": "word " * 200})
    ids, labels, truncated = alpaca_row(prompt, answer, 32, _prompt_tail_length(tokenizer))
    assert truncated and len(ids) == len(labels) == 32
    assert ids[:14] == prompt and labels[:14] == [IGNORE] * 14
    assert labels[14:] == ids[14:] == answer[:18]


def test_overflowing_prompt_keeps_turn_marker_and_some_answer(tokenizer):
    tail = _prompt_tail_length(tokenizer)
    prompt, answer = alpaca_tokens(tokenizer, {"instruction": "long " * 300, "input": "x", "output": "Hello world"})
    ids, labels, truncated = alpaca_row(prompt, answer, 40, tail)
    assert truncated and len(ids) == 40
    trained = [i for i, x in enumerate(labels) if x != IGNORE]
    assert len(trained) >= MIN_ANSWER
    first = trained[0]
    assert ids[first - tail:first] == prompt[-tail:]  # ...<eoh>\n<|Bot|>: right before the answer
    assert ids[0] == 1 and ids[1:3] == prompt[1:3]  # bos and the start of the user text


def test_row_too_short_for_any_answer_is_dropped(tokenizer):
    prompt, answer = alpaca_tokens(tokenizer, {"instruction": "long " * 50, "input": "", "output": "Hi"})
    assert alpaca_row(prompt, answer, 10, _prompt_tail_length(tokenizer)) is None


@pytest.mark.parametrize("src", [ALPACA_EN, ALPACA_ZH], ids=["en", "zh"])
def test_shared_alpaca_samples(tmp_path, tokenizer, src):
    records = json.loads(src.read_text())
    stats = preprocess("alpaca", src, tmp_path / "ds", seq_length=128, tokenizer=tokenizer)
    assert stats["inputs"] == len(records) and stats["rows"] + stats["dropped"] == len(records)
    assert stats["truncated"] > 0  # both files hold answers longer than 128 tokens
    ids, labels = load_rows(tmp_path / "ds")
    assert ids.shape == labels.shape == (stats["rows"], 129)
    trained = labels != IGNORE
    assert trained.any(1).all()  # never an all-ignored row
    assert (labels[trained] == ids[trained]).all()
    assert (ids == EOH).sum(1).min() >= 1 and not np.isin(ids, [103166, 103167]).any()  # real <eoh>, not MindFormers' unused ids
    assert int(trained.sum()) <= stats["tokens"] <= ids.size
    assert json.loads((tmp_path / "ds" / "stats.json").read_text()) == stats
    # the first record, rebuilt by hand from the tokenizer, is the first row
    prompt, answer = alpaca_tokens(tokenizer, records[0])
    row = (prompt + answer)[:129]
    assert ids[0, :len(row)].tolist() == row
    assert labels[0, :len(prompt)].tolist() == [IGNORE] * len(prompt)


def test_wikitext_packing_fills_rows(tmp_path, tokenizer):
    stats = preprocess("wikitext", WIKI, tmp_path / "ds", seq_length=256, tokenizer=tokenizer)
    lines = [s.strip() for s in WIKI.read_text().splitlines() if s.strip()]
    # WikiText's own <unk> marker is the unk id, as MindFormers' preprocessing made it
    expected_tokens = sum(len(tokenizer.encode(s, allow_special=True)) for s in lines)
    assert stats["mode"] == "pack" and stats["tokens"] == expected_tokens and stats["dropped"] == 0
    ids, labels = load_rows(tmp_path / "ds")
    assert (ids == 0).sum() == sum(s.count("<unk>") for s in lines) > 0
    assert ids.shape == (stats["rows"], 257) and stats["rows"] == -(-expected_tokens // 257)
    assert (ids[:-1] != PAD_ID).all()  # only the last row is padded
    assert ((labels == IGNORE) == (ids == PAD_ID)).all()
    first = tokenizer.encode(lines[0], allow_special=True)
    assert ids[0, :len(first)].tolist() == first


def test_wikitext_seed_line_mode(tmp_path, tokenizer):
    stats = preprocess("wikitext", WIKI, tmp_path / "ds", seq_length=128, mode="line", tokenizer=tokenizer)
    lines = [s.strip() for s in WIKI.read_text().splitlines() if s.strip()]
    lengths = [len(tokenizer.encode(s, allow_special=True)) for s in lines]
    assert stats["dropped"] == sum(n < 50 for n in lengths)
    assert stats["rows"] == sum(n >= 50 for n in lengths)
    assert stats["truncated"] == sum(n > 129 for n in lengths)
    ids, _ = load_rows(tmp_path / "ds")
    assert (ids[:, 0] == 1).all()  # every sample is one line starting with bos
    first = next(n for n in lengths if n >= 50)
    assert (ids[0, min(first, 129):] == PAD_ID).all()  # padded with 2 after the line


def test_bad_inputs_have_clear_errors(tmp_path, tokenizer):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        preprocess("alpaca", bad, tmp_path / "a", 64, tokenizer=tokenizer)
    bad.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(DataError, match="record 0"):
        preprocess("alpaca", bad, tmp_path / "a", 64, tokenizer=tokenizer)
    with pytest.raises(DataError, match="kind"):
        preprocess("csv", WIKI, tmp_path / "a", 64, tokenizer=tokenizer)
    with pytest.raises(DataError, match="mode"):
        preprocess("alpaca", ALPACA_EN, tmp_path / "a", 64, mode="pack", tokenizer=tokenizer)
    with pytest.raises(DataError, match="seq_length"):
        preprocess("wikitext", WIKI, tmp_path / "a", 2, tokenizer=tokenizer)
    with pytest.raises(DataError, match="not found"):
        preprocess("wikitext", tmp_path / "missing.txt", tmp_path / "a", 64, tokenizer=tokenizer)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        preprocess("wikitext", WIKI, tmp_path / "exists", 64, tokenizer=tokenizer)
    assert not (tmp_path / "a").exists()


def test_cancel_leaves_nothing(tmp_path, tokenizer):
    seen = []
    with pytest.raises(Cancelled):
        preprocess("alpaca", ALPACA_ZH, tmp_path / "ds", 64, tokenizer=tokenizer,
                   progress=lambda done, total: seen.append((done, total)), cancel=lambda: len(seen) >= 2)
    assert seen[-1][1] == 1000 and not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["alpaca", "wikitext"])
def test_row_file_copies_a_dataset_streaming_and_reads_rows_by_index(tmp_path, kind):
    """The trainer's row source: a copy written a row at a time (its Python allocations peak far
    below the dataset's size, where reading all rows holds them all), then any rows in any order
    read back equal to the dataset's, labels derived for WikiText as load_rows derives them."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n, length = 3000, 129
    ids = rng.integers(0, 1000, (n, length)).astype(np.int32)
    ids[::7, -5:] = PAD_ID
    rows = [{"input_ids": r, "labels": np.where(r % 3 == 0, IGNORE, r)} if kind == "alpaca" else {"input_ids": r}
            for r in ids]
    data = write_dataset(tmp_path / "ds", rows, kind, {})
    want_ids, want_labels = load_rows(data)
    assert np.array_equal(want_ids, ids)
    tracemalloc.start()
    try:
        rf = RowFile.write(data, tmp_path / "rows.npy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < ids.nbytes / 10  # one copy of the ids alone is 1.5 MB
    assert len(rf) == n and rf.length == length and rf.max_id() == ids.max()
    order = rng.permutation(n)[:50]
    got_ids, got_labels = rf[order]
    assert np.array_equal(got_ids, want_ids[order]) and np.array_equal(got_labels, want_labels[order])
    assert np.array_equal(np.load(tmp_path / "rows.npy"), np.stack([want_ids, want_labels], 1))  # a plain .npy
    with pytest.raises(IndexError):
        rf[[n]]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

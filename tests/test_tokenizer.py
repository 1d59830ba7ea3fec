import json

import pytest

from internlm_core.tokenizer import BOS, EOA, EOH, EOS, Tokenizer, TokenizerError, render_chat
from tests.helpers import DATA


def test_reference_check_values(tokenizer):
    assert tokenizer.vocab_size == 103168
    assert tokenizer.encode("<|User|>:你好<eoh>\n<|Bot|>:", bos=False) == [
        333, 352, 1621, 352, 27232, 76379, 103027, 364, 333, 352, 23845, 352, 27232]
    assert tokenizer.encode("<eoh>", bos=False) == [EOH] == [103027]
    assert tokenizer.encode("<eoa>", bos=False) == [EOA] == [103028]
    assert tokenizer.encode("Hello world") == [BOS, 9843, 2028]


def test_literal_special_strings_map_to_ids(tokenizer):
    assert tokenizer.encode("<s>Hello world</s>", bos=False) == [BOS, 9843, 2028, EOS]
    assert tokenizer.encode("a<unk>", bos=False)[-1] == 0
    assert tokenizer.encode("x", eos=True)[-1] == EOS


def test_bundled_model_is_the_reference_model(tokenizer):
    assert Tokenizer().model_file.read_bytes() == tokenizer.model_file.read_bytes()


def test_chat_template():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "你好"}]
    assert render_chat(msgs) == ("<|System|>:Be brief.\n<|User|>:Hi<eoh>\n<|Bot|>:Hello!<eoa>\n"
                                 "<|User|>:你好<eoh>\n<|Bot|>:")
    for bad, match in [([], "at least one"), ([{"role": "robot", "content": "x"}], "role"),
                       ([{"role": "user", "content": 3}], "string"),
                       ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "first"),
                       ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last")]:
        with pytest.raises(TokenizerError, match=match):
            render_chat(bad)


def test_encode_chat_single_bos(tokenizer):
    ids = tokenizer.encode_chat([{"role": "user", "content": "你好"}])
    assert ids == [BOS, 333, 352, 1621, 352, 27232, 76379, 103027, 364, 333, 352, 23845, 352, 27232]


def _texts():
    wiki = (DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    zh = json.loads((DATA / "alpaca" / "alpaca_zh.json").read_text(encoding="utf-8"))
    return {"wikitext": wiki, "alpaca_zh": "\n".join(r["instruction"] + r["input"] + r["output"] for r in zh)}


@pytest.mark.parametrize("name", ["wikitext", "alpaca_zh"])
def test_round_trip_and_streaming(tokenizer, name):
    text = _texts()[name]
    chunks = [text[i:i + 20000] for i in range(0, len(text), 20000)]
    for chunk in chunks:
        ids = tokenizer.encode(chunk, bos=False)
        assert tokenizer.decode(ids) == chunk
    # streaming over a long stretch with byte-fallback characters must equal one-shot decoding
    sample = chunks[0] + "\U0001F600 \u2603 \U00020BB7" + chunks[-1][:3000]
    ids = tokenizer.encode(sample, bos=False)
    assert any(3 <= i <= 258 for i in ids), "the sample should exercise byte-fallback pieces"
    dec = tokenizer.stream_decoder()
    parts = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(parts) == tokenizer.decode(ids) == sample
    assert not any("\ufffd" in p for p in parts)


def test_skip_special(tokenizer):
    ids = tokenizer.encode("<s>Hello<unk> world</s>", bos=False)
    assert tokenizer.decode(ids) == "<s>Hello<unk> world</s>"
    assert tokenizer.decode(ids, skip_special=True) == "Hello world"
    dec = tokenizer.stream_decoder(skip_special=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "Hello world"


def test_decode_rejects_out_of_range(tokenizer):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([5, 103168])

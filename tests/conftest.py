import pytest

import internlm_core  # noqa: F401  (first: it picks protobuf's runtime before any stub loads protobuf)
from tests.helpers import TOKENIZER_MODEL, RedisServer, hf_reference_model, save_chat_model, save_hf_folder


@pytest.fixture(scope="session")
def tokenizer():
    from internlm_core.tokenizer import Tokenizer

    return Tokenizer(TOKENIZER_MODEL)


@pytest.fixture(scope="session")
def tiny_config():
    from internlm_core.config import Config

    return Config.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_config):
    """(HF reference model, its HF InternLM folder) for the tiny preset."""
    model = hf_reference_model(tiny_config)
    return model, save_hf_folder(model, tiny_config, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_hf):
    from internlm_core.convert import hf_to_ms

    dst = tmp_path_factory.mktemp("ms") / "tiny"
    hf_to_ms(tiny_hf[1], dst)
    return dst


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """A small random model with the real tokenizer's vocabulary, for text-in/text-out tests."""
    return save_chat_model(tmp_path_factory.mktemp("chat") / "tiny-chat", "tiny-chat", std=0.5)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def v2_tokenizer_file(tmp_path_factory):
    """A sentencepiece model in InternLM2's manner, trained here (the real one cannot be fetched):
    byte fallback, <unk> 0, <s> 1, </s> 2, and ``<|im_start|>``/``<|im_end|>`` as single pieces."""
    import sentencepiece as spm

    from tests.helpers import DATA

    out = tmp_path_factory.mktemp("v2tok")
    text = (DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:300_000]
    (out / "corpus.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"),
                                   vocab_size=1200, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   minloglevel=2)
    return out / "tokenizer.model"

"""The Tokenizer service against the core tokenizer: the tokenizer service (directly and through
the endpoint) and an inference worker, which serves it too with its model's tokenizer (one
servicer, the same checks and limits)."""
import grpc
import pytest

from services.pb import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

TEXTS = ["Hello world", "你好，世界", "", "tabs\tand  spaces <s> literal", "emoji 🙂 ok"]


@pytest.fixture(params=["tokenizer_service", "endpoint", "worker"])
def tok_stub(request):
    return tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(request.getfixturevalue(request.param).address))


def test_encode_decode_single_and_batched(tok_stub, core_tokenizer):
    for t in TEXTS:
        ids = list(tok_stub.Encode(tokenizer_pb2.EncodeRequest(text=t), timeout=10).ids)
        assert ids == core_tokenizer.encode(t)
        assert tok_stub.Decode(tokenizer_pb2.DecodeRequest(ids=ids[1:]), timeout=10).text == core_tokenizer.decode(ids[1:])
    batch = tok_stub.EncodeBatch(tokenizer_pb2.EncodeBatchRequest(texts=TEXTS, no_bos=True, add_eos=True), timeout=10)
    assert [list(i.ids) for i in batch.items] == [core_tokenizer.encode(t, bos=False, eos=True) for t in TEXTS]
    texts = tok_stub.DecodeBatch(tokenizer_pb2.DecodeBatchRequest(items=[
        common_pb2.TokenIds(ids=core_tokenizer.encode(t, bos=False)) for t in TEXTS]), timeout=10).texts
    assert list(texts) == TEXTS


def test_chat_template_and_counts(tok_stub, core_tokenizer):
    messages = [common_pb2.ChatMessage(role="system", content="Be brief."),
                common_pb2.ChatMessage(role="user", content="Hi"),
                common_pb2.ChatMessage(role="assistant", content="Hello."),
                common_pb2.ChatMessage(role="user", content="Bye")]
    r = tok_stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=messages), timeout=10)
    assert r.text == ("<|System|>:Be brief.\n<|User|>:Hi<eoh>\n<|Bot|>:Hello.<eoa>\n<|User|>:Bye<eoh>\n<|Bot|>:")
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    assert list(r.ids) == core_tokenizer.encode_chat(as_dicts)
    count = tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(chat=common_pb2.ChatMessages(messages=messages)))
    assert count.count == len(r.ids)
    assert tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(text="Hello world")).count == 2


def test_special_token_strings_are_text_unless_allowed(tok_stub, core_tokenizer):
    text = "x<eoa>y</s>"
    plain = list(tok_stub.Encode(tokenizer_pb2.EncodeRequest(text=text, no_bos=True), timeout=10).ids)
    allowed = list(tok_stub.Encode(tokenizer_pb2.EncodeRequest(text=text, no_bos=True, allow_special_tokens=True),
                                   timeout=10).ids)
    assert plain == core_tokenizer.encode(text, bos=False) and 103028 not in plain and 2 not in plain
    assert allowed == core_tokenizer.encode(text, bos=False, allow_special=True) and allowed[1] == 103028
    assert allowed[-1] == 2
    batch = tok_stub.EncodeBatch(tokenizer_pb2.EncodeBatchRequest(texts=[text], allow_special_tokens=True), timeout=10)
    assert list(batch.items[0].ids) == [1] + allowed
    messages = [common_pb2.ChatMessage(role="user", content="<eoa>")]
    r = tok_stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=messages), timeout=10)
    assert r.text == "<|User|>:<eoa><eoh>\n<|Bot|>:"
    assert 103028 not in r.ids and list(r.ids).count(103027) == 1  # the template's <eoh> only
    r2 = tok_stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=messages, allow_special_tokens=True),
                                    timeout=10)
    assert r2.text == r.text and 103028 in r2.ids
    chat = common_pb2.ChatMessages(messages=messages)
    assert tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(chat=chat)).count == len(r.ids)
    assert tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(chat=chat, allow_special_tokens=True)).count == len(r2.ids)
    assert tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(text="<eoa>", allow_special_tokens=True)).count == 1
    assert tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(text="<eoa>")).count == 4


@pytest.mark.parametrize("call, request_, words", [
    ("Decode", tokenizer_pb2.DecodeRequest(ids=[5, 999999]), "outside the vocabulary"),
    ("ApplyChatTemplate", tokenizer_pb2.ChatTemplateRequest(), "at least one message"),
    ("ApplyChatTemplate", tokenizer_pb2.ChatTemplateRequest(messages=[common_pb2.ChatMessage(role="bot")]), "role"),
])
def test_bad_input(tok_stub, call, request_, words):
    with pytest.raises(grpc.RpcError) as e:
        getattr(tok_stub, call)(request_, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()


def test_text_past_a_prompts_size_is_refused_before_encoding(tok_stub):
    from internlm_core.generation import MAX_PROMPT_CHARS

    over = "a" * (MAX_PROMPT_CHARS + 1)
    said = f"{MAX_PROMPT_CHARS + 1} characters, over the {MAX_PROMPT_CHARS}"
    chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=over)])
    for label, call in {
        "text": lambda: tok_stub.Encode(tokenizer_pb2.EncodeRequest(text=over), timeout=10),
        "texts": lambda: tok_stub.EncodeBatch(tokenizer_pb2.EncodeBatchRequest(texts=[over[:10], over[10:]]),
                                              timeout=10),
        "messages": lambda: tok_stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=chat.messages),
                                                       timeout=10),
        "chat": lambda: tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(chat=chat), timeout=10),
    }.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"{label}: {said}" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(text=over), timeout=10)
    assert f"text: {said}" in e.value.details()
    assert tok_stub.CountTokens(tokenizer_pb2.CountTokensRequest(text=over[:1000]), timeout=10).count > 0


def test_the_model_a_host_answers_for(tokenizer_service, worker, chat_model_dir, core_tokenizer):
    """The tokenizer service holds no model's name: a request naming one is refused there, naming
    it (the endpoint routes those to the model's workers); a worker answers for its own model, and
    a model it does not serve is NOT_FOUND, as its Generate's."""
    service = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(tokenizer_service.address))
    with pytest.raises(grpc.RpcError) as e:
        service.Encode(tokenizer_pb2.EncodeRequest(text="Hi", model="internlm2-chat-7b"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model 'internlm2-chat-7b'" in e.value.details()
    worker_stub = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(worker.address))
    own = chat_model_dir.resolve().name
    assert list(worker_stub.Encode(tokenizer_pb2.EncodeRequest(text="Hi", model=own), timeout=10).ids) == \
        core_tokenizer.encode("Hi")
    with pytest.raises(grpc.RpcError) as e:
        worker_stub.CountTokens(tokenizer_pb2.CountTokensRequest(text="Hi", model="internlm2-chat-7b"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown model 'internlm2-chat-7b'" in e.value.details()

"""Builders shared by the tests: tiny HF reference models and project model folders."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("INTERNLM_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
TOKENIZER_MODEL = DATA / "internlm-tokenizer" / "tokenizer.model"
# The real InternLM2 / 2.5 tokenizer: its tokenizer.model names the chat ids [UNUSED_TOKEN_*], its
# tokenizer_config.json names them <|im_start|> etc. (as a published checkpoint's folder has them)
V2_TOKENIZER = DATA / "internlm2-tokenizer"


def pytest_on_build(test_file: str, march: str, select: str, cache: Path, timeout: int = 900):
    """``test_file``'s tests selected by ``select`` (pytest's -k), run in a fresh process on the kernels
    built for ``march`` (``INTERNLM_KERNEL_MARCH``) into their own cache folder; asserts they all ran
    and passed there, and returns the run."""
    import sys

    from internlm_core import kernels

    env = {**os.environ, "INTERNLM_KERNEL_DIR": str(cache), kernels.ENV_MARCH: march}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k",
                          select], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout
    return run


def llama_config(cfg):
    """The HF LLaMA config that is the same network as an InternLM config."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_position_embeddings,
              head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
              # LLaMA has one switch for q/k/v/o: an o without bias is an o_proj bias held at zero
              attention_bias=cfg.bias or cfg.out_bias, mlp_bias=cfg.mlp_bias,
              tie_word_embeddings=False, rope_theta=cfg.rope_base, bos_token_id=cfg.bos_id,
              eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id)
    if cfg.rope_scaling == "dynamic":
        kw["rope_scaling"] = {"rope_type": "dynamic", "factor": cfg.rope_scaling_factor}
    return LlamaConfig(**kw)


def hf_reference_model(cfg, seed: int = 0, scale: float = 0.2):
    """A random HF LlamaForCausalLM (eval mode, fp32) standing for InternLM with ``cfg`` (a bias the
    config does not have, which LLaMA's single switch makes, is zero: see ``hf_state_dict``)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, scale)
        for name, p in model.named_parameters():
            if name.endswith("bias") and name not in hf_state_dict(model, cfg):
                p.zero_()
    return model


def hf_state_dict(model, cfg) -> dict:
    """The reference model's tensors as an HF folder of ``cfg`` holds them (LLaMA's names), less the
    biases ``cfg`` does not have (LLaMA cannot bias q/k/v without o)."""
    from internlm_core.convert import hf_name

    wanted = {hf_name(n) for n in cfg.param_shapes()}
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items() if k in wanted}


def hf_logits(ref, ids: list[int]):
    """The reference model's logits (T, V) for one sequence of ids."""
    import torch

    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(ref, prompt: list[int], n: int = 32) -> list[int]:
    """HF's cached greedy generation of exactly ``n`` tokens after ``prompt`` (no stop token)."""
    import torch

    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def save_hf_folder(model, cfg, folder: Path, safetensors: bool = True, max_shard_size: str | None = None,
                   dtype: str = "float32") -> Path:
    """Save ``model`` as an HF InternLM folder (InternLM config.json, LLaMA tensor names)."""
    import torch

    import copy

    folder = Path(folder)
    # a copy: Module.to() casts in place, and the caller's reference model must stay fp32
    m = copy.deepcopy(model).to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    kw = {"safe_serialization": safetensors}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    m.save_pretrained(folder, **kw)
    (folder / "config.json").write_text(json.dumps(cfg.replace(dtype=dtype).to_hf_config(), indent=2))
    (folder / "generation_config.json").unlink(missing_ok=True)
    return folder


def save_internlm2_folder(model, cfg, folder: Path, group_order=None) -> Path:
    """Save a LLaMA-layout ``model`` with GQA as an HF InternLM2 folder: InternLM2's names, q/k/v
    packed into ``wqkv`` grouped per k/v head by this test code itself (not by the project's
    converter), and an InternLM2 config.json. ``group_order`` permutes the slots inside each group
    (the q heads, then k, then v) to make a wrongly packed file."""
    from safetensors.numpy import save_file

    kv, hd = cfg.kv_heads, cfg.head_dim
    g = cfg.num_heads // kv
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for n in range(cfg.num_layers):
        p, q = f"model.layers.{n}.", f"model.layers.{n}."
        slots = [sd[f"{p}self_attn.q_proj.weight"].reshape(kv, g, hd, -1),
                 sd[f"{p}self_attn.k_proj.weight"].reshape(kv, 1, hd, -1),
                 sd[f"{p}self_attn.v_proj.weight"].reshape(kv, 1, hd, -1)]
        packed = np.concatenate(slots, axis=1)  # (kv, g + 2, hd, hidden)
        if group_order is not None:
            packed = packed[:, group_order]
        out[f"{q}attention.wqkv.weight"] = packed.reshape(-1, cfg.hidden_size)
        out[f"{q}attention.wo.weight"] = sd[f"{p}self_attn.o_proj.weight"]
        out[f"{q}feed_forward.w1.weight"] = sd[f"{p}mlp.gate_proj.weight"]
        out[f"{q}feed_forward.w3.weight"] = sd[f"{p}mlp.up_proj.weight"]
        out[f"{q}feed_forward.w2.weight"] = sd[f"{p}mlp.down_proj.weight"]
        out[f"{q}attention_norm.weight"] = sd[f"{p}input_layernorm.weight"]
        out[f"{q}ffn_norm.weight"] = sd[f"{p}post_attention_layernorm.weight"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    return folder


def save_internlm3_folder(model, cfg, folder: Path) -> Path:
    """Save a LLaMA-layout ``model`` as an HF InternLM3 folder: LLaMA's names, the biases its two
    switches give, and an InternLM3 config.json (head_dim, qkv_bias, bias)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in hf_state_dict(model, cfg).items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    return folder


V3_CONTROLS = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")


def v3_tokenizer_folder(out: Path, vocab_size: int) -> Path:
    """A sentencepiece model trained here in InternLM3's manner (byte fallback, <unk> 0, <s> 1,
    </s> 2; its files cannot be fetched), whose chat pieces are placeholders that the folder's
    tokenizer_config.json names, as a published checkpoint's files name its ids."""
    import sentencepiece as spm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text((DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:200_000],
                                    encoding="utf-8")
    placeholders = [f"[UNUSED_TOKEN_{i}]" for i in range(len(V3_CONTROLS))]
    spm.SentencePieceTrainer.train(input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, user_defined_symbols=placeholders, minloglevel=2)
    (out / "corpus.txt").unlink()
    (out / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    decoder = {str(sp.piece_to_id(p)): {"content": name, "special": True} for p, name in zip(placeholders, V3_CONTROLS)}
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLM3Tokenizer",
                                                           "added_tokens_decoder": decoder}))
    return out


def internlm2_checkpoint(folder: Path, seed: int = 5, **overrides) -> tuple[object, Path]:
    """(HF reference model, folder): a tiny InternLM2 HF folder as InternLM publishes one, with the
    real tokenizer's 92544-id vocabulary, its ``tokenizer.model`` and ``tokenizer_config.json``."""
    from internlm_core.config import Config

    cfg = Config.from_name("tiny-v2", vocab_size=92544, **overrides)
    ref = hf_reference_model(cfg, seed=seed)
    folder = save_internlm2_folder(ref, cfg, folder)
    for f in V2_TOKENIZER.iterdir():
        shutil.copyfile(f, folder / f.name)
    return ref, folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a loopback port, with persistence (AOF) in its own folder."""

    def __init__(self, folder: Path | None = None, port: int | None = None):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="redis-"))
        self.port = port or free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        from services.launcher import redis_command

        # The settings the launcher and compose ship (appendfsync everysec), so that the restart
        # and crash tests see what a deployment sees.
        self.proc = subprocess.Popen([exe, *redis_command(self.port, self.folder)[1:]],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def crash(self) -> None:
        """kill -9 and start again on the same data folder."""
        self.proc.kill()
        self.proc.wait(10)
        self.start()


def byte_pieces(tokenizer, text: str) -> list[int]:
    """``text`` spelled in byte-fallback pieces (<0xNN>), as a model may generate any character."""
    return [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode()]


def random_ids(n: int, vocab: int, seed: int = 0, low: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(low, vocab, n).tolist()


def random_adapter(cfg, spec, folder, seed: int, std: float = 0.2):
    """A LoRA adapter folder with random A and B on every target of ``spec`` (B nonzero, unlike a
    fresh one, so that it changes the model)."""
    from internlm_core.lora import module_shape, save_adapter, target_modules

    rng = np.random.default_rng(seed)
    weights = {}
    for m in target_modules(cfg, spec.targets):
        out_f, in_f = module_shape(cfg, m)
        weights[f"{m}.lora_a"] = rng.normal(0, std, (spec.rank, in_f)).astype(np.float32)
        weights[f"{m}.lora_b"] = rng.normal(0, std, (out_f, spec.rank)).astype(np.float32)
    return save_adapter(weights, spec, cfg, folder)


def save_chat_model(folder, name: str, std: float):
    """A tiny random model with the real tokenizer's vocabulary (for text-in/text-out tests), its
    weights drawn with ``std``, saved to ``folder`` with the tokenizer."""
    from internlm_core.config import Config
    from internlm_core.loader import save_model
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name("tiny", vocab_size=103168, max_position_embeddings=256).replace(name=name)
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=1, std=std)
    return save_model(model, cfg, folder, tokenizer_from=TOKENIZER_MODEL.parent)


def serving_adapter(model_dir, folder):
    """A rank-4 LoRA adapter on wq and wv of the model in ``model_dir``, random enough to change its
    answers (what the serving tests load into a worker)."""
    from internlm_core.config import Config
    from internlm_core.lora import AdapterSpec

    spec = AdapterSpec(rank=4, alpha=8.0, targets=("wq", "wv"))
    return random_adapter(Config.from_checkpoint(model_dir), spec, folder, seed=7, std=0.5)

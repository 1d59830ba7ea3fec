"""Draft-model speculative decoding: a small model of the same tokenizer proposes the next tokens.

Where prompt lookup (``speculative.propose``) finds proposals only in text that repeats, a draft
model (e.g. an InternLM2-1.8B-shaped one for an InternLM2.5-7B-shaped target) guesses them
anywhere, at a fraction of the target's cost a token. ``Drafter`` holds the draft's engine beside
the target's: the same slots and positions, its own (small) KV cache, so slot s of the draft holds
the draft's rows of the sequence in the target's slot s.

What the draft's slot holds is tracked as one number a slot, ``fed[s]``: its rows 0..fed[s]-1 are
the draft's rows of that slot's first fed[s] tokens (what the target has written is the sequence's
tokens but the last: ``fed[s] <= length - 1`` between steps). Proposing k tokens for a sequence:
one draft step feeds the tokens the draft has not seen (the target's last token, and after a run
kept whole also the last proposal: one or two rows, each a decode row of its own through
``Engine.verify``) and takes the greedy token after the last; k - 1 more decode steps each feed
the previous proposal. All the speculating sequences share each of these draft steps. The
proposals are then verified by the target (``speculative.accept``): a greedy request's (or a
constrained one's) are the draft's greedy tokens, point masses, so the output is exactly the
target's; a sampled request's are drawn from the draft's processed distribution and judged by the
rejection rule (``speculative.DraftSampler``, ``judge``): the target's distribution exactly, with
far more proposals kept than a greedy token would be. After the target's
step the draft is rolled back (``rollback``) to the tokens it fed that the sequence kept: the rows
of a rejected proposal lie past ``fed`` and the next feed writes over them before any query reads
them, as on the target's side; so the draft's cache holds exactly what a draft that had decoded
only the kept tokens holds.

A sequence that proposes nothing for a while (``speculative.Adaptive``'s pauses) falls behind the
draft by a token a step; it catches up with one prefill of the missed tokens when it next proposes.
A new request's context (its prompt, or prompt + ``resume_ids`` after a failover) is prefilled into
the draft beside the target's prefill; the draft's rows of a freed slot are reused as far as the
target's are (``place``): they are a prefix of the target's, and a draft serves no adapters.
"""
from __future__ import annotations

import numpy as np

from .errors import CheckpointError, TokenizerError

CATCH_UP_ROWS = 2  # tokens a draft step feeds as decode rows; more behind: prefilled first


def check_pair(target_cfg, target_tok, draft_cfg, draft_tok) -> None:
    """TokenizerError unless the draft's proposals mean what the target reads: the same vocabulary
    size and the same tokenizer (the same sentencepiece model, or the same pieces id for id, and
    the same special tokens)."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise TokenizerError(f"the draft model's vocabulary has {draft_cfg.vocab_size} ids, the target's "
                             f"{target_cfg.vocab_size}: a draft must share the target's tokenizer")
    same = draft_tok.sp.serialized_model_proto() == target_tok.sp.serialized_model_proto() or (
        draft_tok.vocab_size == target_tok.vocab_size
        and all(draft_tok.sp.id_to_piece(i) == target_tok.sp.id_to_piece(i) for i in range(target_tok.vocab_size)))
    if not same:
        raise TokenizerError(f"the draft model's tokenizer ({draft_tok.model_file}) differs from the target's "
                             f"({target_tok.model_file}): a draft must share the target's tokenizer")
    if draft_tok.special_tokens != target_tok.special_tokens:
        differ = sorted(set(draft_tok.special_tokens.items()) ^ set(target_tok.special_tokens.items()))
        raise TokenizerError(f"the draft model's special tokens differ from the target's (e.g. {differ[0][0]!r}): "
                             "a draft must share the target's tokenizer")


def check_draft_model(speculate: str, draft_folder, target_folder, target_cfg, target_tok):
    """The config of the draft model in ``draft_folder`` (None without one) for serving the model
    in ``target_folder`` with ``speculate`` (auto, or one of the batcher's SPECULATION), or a
    ValueError naming the option and what is wrong: a draft that no mode uses, a draft mode without
    a draft, a draft or a target that is an exported model (no verify step), a draft whose
    tokenizer is not the target's. Reads configs and tokenizers only: before any weights load."""
    from pathlib import Path

    from .checkpoint import MANIFEST_FILE, read_config
    from .tokenizer import Tokenizer

    if not draft_folder:
        if speculate == "draft":
            raise ValueError("--speculate draft needs --draft-model DIR")
        return None
    where = f"--draft-model {draft_folder}"
    if speculate not in ("auto", "draft"):
        raise ValueError(f"{where}: a draft model is used by --speculate draft or auto, not {speculate}")
    folder = Path(draft_folder)
    for what, path in (("an exported model cannot be a draft", folder),
                       ("the target is an exported model, which cannot speculate", Path(target_folder))):
        if (path / MANIFEST_FILE).is_file():
            raise ValueError(f"{where}: {what} (it needs the CPU kernels' verify step)")
    try:
        draft_cfg = read_config(folder)
        check_pair(target_cfg, target_tok, draft_cfg, Tokenizer.for_model(folder, draft_cfg.family))
    except (TokenizerError, CheckpointError) as e:
        raise type(e)(f"{where}: {e}") from None
    return draft_cfg


class Drafter:
    """A draft engine beside a target engine (same slots and positions); see the module docstring."""

    def __init__(self, engine, target):
        if not getattr(engine, "kernels", False):
            raise ValueError("the draft model needs an engine on the CPU kernels (Engine.verify)")
        if (engine.max_batch, engine.max_len) != (target.max_batch, target.max_len):
            raise ValueError(f"the draft engine has {engine.max_batch} slots x {engine.max_len} positions, the "
                             f"target {target.max_batch} x {target.max_len}: they must be the same")
        if engine.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {engine.config.vocab_size} ids, the target's "
                             f"{target.config.vocab_size}")
        self.engine = engine
        self.fed = [0] * engine.max_batch  # per slot: the draft rows that hold its tokens (module docstring)

    def place(self, slot: int, reused: int) -> None:
        """A request takes ``slot`` with its first ``reused`` context tokens already in the target's
        rows: the draft's rows are good as far as both hold the same tokens (the draft's rows of
        the slot's last request are a prefix of the target's, which are its tokens, so those
        ``reused`` tokens are the same)."""
        self.fed[slot] = min(self.fed[slot], reused)

    def prefill(self, slots: list[int], contexts: list[list[int]], ends: list[int] | None = None) -> None:
        """Feed each context (a prompt, with resumed tokens) up to ``ends[i]`` (None: its end),
        from what the slot holds on."""
        ends = [len(c) for c in contexts] if ends is None else ends
        todo = [i for i, (s, e) in enumerate(zip(slots, ends)) if self.fed[s] < e]
        if not todo:
            return
        self.engine.prefill([slots[i] for i in todo], [contexts[i] for i in todo],
                            starts=[self.fed[slots[i]] for i in todo], ends=[ends[i] for i in todo])
        for i in todo:
            self.fed[slots[i]] = ends[i]

    def propose(self, slots: list[int], tokens: list[list[int]], ks: list[int], pickers=None) -> list[list[int]]:
        """Up to ``ks[i]`` draft tokens after ``tokens[i]`` (sequence i's tokens so far, in
        ``slots[i]``); [] where ``ks[i]`` is 0. All sequences share each draft step. Each token is
        the draft's greedy one, or ``pickers[i](logits)``'s where that is not None (a sampled
        request's ``speculative.DraftSampler``)."""
        pickers = pickers or [None] * len(slots)

        def pick(i, row):
            return int(np.argmax(row)) if pickers[i] is None else pickers[i](row)
        out = [[] for _ in slots]
        go = [i for i, k in enumerate(ks) if k > 0]
        if not go:
            return out
        behind = [i for i in go if len(tokens[i]) - self.fed[slots[i]] > CATCH_UP_ROWS]
        if behind:  # missed tokens (a pause in proposing): prefilled, all but the last rows
            self.prefill([slots[i] for i in behind], [tokens[i] for i in behind],
                         [len(tokens[i]) - 1 for i in behind])
        chunks = [tokens[i][self.fed[slots[i]]:] for i in go]
        rows = self.engine.verify([slots[i] for i in go], chunks, [self.fed[slots[i]] for i in go])
        for i, r in zip(go, rows):
            self.fed[slots[i]] = len(tokens[i])
            out[i].append(pick(i, r[-1]))
        for j in range(1, max(ks)):  # each further proposal: one decode step of the sequences wanting it
            more = [i for i in go if ks[i] > j]
            logits = self.engine.decode([out[i][-1] for i in more], [self.fed[slots[i]] for i in more],
                                        slots=[slots[i] for i in more])
            for i, row in zip(more, logits):
                self.fed[slots[i]] += 1
                out[i].append(pick(i, row))
        return out

    def rollback(self, slot: int, length: int) -> None:
        """After the target's step the sequence has ``length`` tokens: the draft keeps the rows of
        the tokens it fed that were kept (its fed tokens agree with the sequence up to the first
        rejected proposal, which sits at ``length - 1`` or later)."""
        self.fed[slot] = min(self.fed[slot], length - 1)

"""Tokenizers for the SFT and RL stages: load one from disk, or train a tiny byte-level BPE in R1's chat format.

Nothing here touches the network: a directory is read with ``local_files_only`` and a bare
``tokenizer.json`` is wrapped directly. The trained tokenizer uses DeepSeek-R1's own special-token
strings and a chat template in R1's format::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜><think>
    {reasoning}
    </think>

    {answer}<｜end▁of▁sentence｜>

The ``<think>`` block is rendered only when an assistant message has a ``reasoning`` field. With
``add_generation_prompt`` the template ends with ``<｜Assistant｜>``; R1's recommended forced
``<think>\\n`` prefix is the generation code's business, not the template's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from r1mega.config.errors import ConfigError
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END)
"""R1's token strings, in id order 0..6 of a trained tokenizer (BOS 0, EOS 1, pad 2 as in DeepSeek-V3)."""

R1_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('A system message may only come first.') -}}{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '" + USER + "' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT + "' -}}"
    "{%- if 'reasoning' in message and message['reasoning'] -%}"
    "{{- '" + THINK_START + "\\n' + message['reasoning'] + '\\n" + THINK_END + "\\n\\n' -}}"
    "{%- endif -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('Unknown role ' + message['role'] + ': use system, user or assistant.') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "' -}}{%- endif -%}"
)
"""DeepSeek-R1's conversation format; an assistant ``reasoning`` field renders inside ``<think>``."""

# Qwen2's pre-tokenizer split: words, single digits (arithmetic reads digit by digit), punctuation, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or trained; the message says why and what to do."""


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local directory or a bare ``tokenizer.json``; never downloads.

    A directory (``tokenizer.json`` + ``tokenizer_config.json``, e.g. a Qwen2.5 or Llama checkpoint, or
    the output of :func:`train_tokenizer`) keeps its chat template and special tokens. A bare
    ``tokenizer.json`` that contains R1's special tokens gets R1's BOS/EOS/pad roles and chat template;
    any other bare file comes without a chat template.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenizerError(
            f"No tokenizer at {path!r}: give a directory with tokenizer.json (and tokenizer_config.json) "
            "or the path of a tokenizer.json file."
        )
    try:
        if p.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        else:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(p))
            _adopt_r1_format(tokenizer)
    except Exception as e:  # the libraries raise many types for a bad file; report one clear error
        raise TokenizerError(
            f"Could not read a tokenizer from {path!r} ({type(e).__name__}: {e}). Check that it holds a valid "
            "tokenizer.json (a Hugging Face fast tokenizer)."
        ) from e
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            f"The tokenizer at {path!r} is not a fast (tokenizers-backed) tokenizer; "
            "save it with a tokenizer.json file (tokenizer.save_pretrained does)."
        )
    log.info(
        "Loaded tokenizer from %s: %d tokens, chat template: %s", path, len(tokenizer), bool(tokenizer.chat_template)
    )
    return tokenizer


def load_model_tokenizer(path: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """``load_tokenizer(path)`` for a model with ``vocab_size`` embedding rows; a larger tokenizer is a config error
    (its extra ids would index past the embedding)."""
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > vocab_size:
        raise ConfigError("model.vocab_size", vocab_size, f"at least the {len(tokenizer)} tokens of tokenizer {path}")
    return tokenizer


def _adopt_r1_format(tokenizer: PreTrainedTokenizerFast) -> None:
    """Give a bare tokenizer.json R1's special-token roles and chat template when its vocabulary has them."""
    vocab = tokenizer.get_vocab()
    if all(token in vocab for token in SPECIAL_TOKENS):
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = BOS, EOS, PAD
        tokenizer.chat_template = R1_CHAT_TEMPLATE


def pad_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The id to pad with: the pad token, or EOS for tokenizers without one (Llama)."""
    token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise TokenizerError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return int(token_id)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` with R1's special tokens and chat template; save it to ``out_dir``.

    Ids 0..6 are BOS, EOS, pad, ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``, ``</think>``. The last two are
    atomic but not "special", so decoding with ``skip_special_tokens`` keeps the reasoning delimiters a
    format reward looks for. Digits are split one per token (Qwen2's pre-tokenizer). The same corpus
    gives the same tokenizer. ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads the result
    with its chat template. The vocabulary can come out smaller than ``vocab_size`` when the corpus has
    fewer pairs seen ``min_frequency`` times.
    """
    minimum = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: use at least {minimum} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + merges)."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Re-register the think tags as plain (non-special) added tokens; their ids stay 5 and 6.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = R1_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    _portable_class_name(out / "tokenizer_config.json")
    log.info("Trained a byte-level BPE with %d tokens (asked for %d); saved to %s", len(tokenizer), vocab_size, out)
    return tokenizer


def _portable_class_name(config_file: Path) -> None:
    """Name the class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both resolve."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

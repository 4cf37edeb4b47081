"""Build a small, real byte-level BPE ``tokenizer.json`` for synthetic checkpoints.

The tokenizer is trained with the ``tokenizers`` library on a few KB of English
taken from the running Python itself (the Zen of Python, which survives
``python -OO``, plus module docstrings of a fixed list of stdlib modules). It is
byte-level, so any text encodes without unknown tokens. Training is deterministic
for a given Python version.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
from typing import Any

# stdlib modules whose docstrings make the training text (all pure Python)
_CORPUS_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "csv",
    "dataclasses",
    "difflib",
    "fractions",
    "functools",
    "heapq",
    "json",
    "pathlib",
    "random",
    "shutil",
    "string",
    "textwrap",
)


def training_text() -> list[str]:
    """Paragraphs of English used to train the synthetic tokenizers.

    Returns
    -------
    list of str
        The Zen of Python first, then stdlib docstrings (absent under ``-OO``).
    """
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints
        import this

    texts = [codecs.decode(this.s, "rot13")]
    for name in _CORPUS_MODULES:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, a) for a in sorted(vars(mod)) if a[:1] != "_"]
        for obj in objs:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                texts.append(doc)
    return texts


def build_tokenizer(
    special_tokens: list[str],
    vocab_size: int,
    bos_token: str | None = None,
) -> Any:
    """Train a byte-level BPE tokenizer.

    Parameters
    ----------
    special_tokens : list of str
        Added first, so they get ids ``0 .. len(special_tokens)-1`` in this order.
    vocab_size : int
        Target size; the result may be smaller when the text runs out of merges.
        Must be at least ``len(special_tokens) + 256`` (the byte alphabet).
    bos_token : str or None
        When given, encoding prepends it (a ``TemplateProcessing`` post-processor),
        as Llama/Mistral tokenizers do.

    Returns
    -------
    tokenizers.Tokenizer
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(special_tokens) + len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {len(alphabet)} byte tokens "
            f"plus {len(special_tokens)} special tokens"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer)
    if bos_token is not None:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(
    tok: Any,
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str | None,
    unk_token: str | None,
    chat_template: str,
    model_max_length: int,
) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that goes with ``tok`` (as transformers writes it).

    Returns
    -------
    dict
        ``added_tokens_decoder``, special tokens, ``chat_template`` and the
        ``PreTrainedTokenizerFast`` class name.
    """
    added = {
        str(tok.token_to_id(t.content)): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in tok.get_added_tokens_decoder().values()
    }
    return {
        "add_bos_token": bos_token is not None,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": bos_token,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk_token,
    }

"""Text in, text out: the store's ``tokenizer.json`` (Hugging Face
``tokenizers``), its BOS/EOS settings and chat template, and incremental
detokenization that only ever emits complete UTF-8 text.

The manifest's ``tokenizer`` table reads::

    {"file": "tokenizer.json", "chat_template": "{% for m in messages %}...",
     "bos_token_id": 1, "eos_token_ids": [2], "add_bos_token": true}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mer_cli.errors import FormatError, UsageError
from mer_cli.formats.store import MANIFEST, Store


class Tokenizer:
    """Encode/decode with a store's tokenizer.

    Parameters
    ----------
    tokenizer : tokenizers.Tokenizer
    bos_token_id : int or None
    eos_token_ids : sequence of int
    add_bos_token : bool
        Prepend BOS to an encoded prompt (unless the text already starts with it).
    chat_template : str or None
        A Jinja2 chat template, as in Hugging Face ``tokenizer_config.json``.
    where : str
        Where these settings came from, for messages.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
        chat_template: str | None = None,
        where: str = "tokenizer",
    ) -> None:
        self.tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.add_bos_token = bool(add_bos_token) and bos_token_id is not None
        self.chat_template = chat_template or None
        self.where = where
        self._template = None

    @classmethod
    def from_store(cls, store: Store) -> Tokenizer:
        """The tokenizer a store carries (``tokenizer.file`` in its manifest)."""
        from tokenizers import Tokenizer as HFTokenizer

        info = store.tokenizer or {}
        where = f"{store.path / MANIFEST}"
        name = info.get("file")
        if not name:
            raise FormatError(
                f"{where}: the store has no tokenizer (tokenizer.file is not set), so "
                "it cannot turn text into tokens; quantize a checkpoint that has "
                "tokenizer.json"
            )
        path = store.path / name
        if not path.is_file():
            raise FormatError(
                f"{path}: tokenizer file named by tokenizer.file in {where} is "
                "missing; restore it or re-run mer quantize"
            )
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exception
            raise FormatError(
                f"{path}: not a readable tokenizer.json ({e}); re-run mer quantize"
            ) from e
        eos = info.get("eos_token_ids") or []
        if isinstance(eos, int):
            eos = [eos]
        return cls(
            tok,
            bos_token_id=info.get("bos_token_id"),
            eos_token_ids=eos,
            add_bos_token=bool(info.get("add_bos_token", False)),
            chat_template=info.get("chat_template"),
            where=where,
        )

    # -------------------------------------------------------------- tokens

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``. Special-token text (``<s>``) maps to its id;
        BOS is prepended per the manifest unless the text already starts with it."""
        ids = list(self.tok.encode(text, add_special_tokens=False).ids)
        bos = self.add_bos_token if add_bos is None else add_bos
        if bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, int(self.bos_token_id))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def is_eos(self, token: int) -> bool:
        return token in self.eos_token_ids

    def token_text(self, token: int | None) -> str:
        if token is None:
            return ""
        return self.tok.id_to_token(int(token)) or ""

    # -------------------------------------------------------------- chat

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` (``[{"role": "user", "content": ...}]``) with the
        store's chat template."""
        if self.chat_template is None:
            raise UsageError(
                f"--chat: the store has no chat template (tokenizer.chat_template "
                f"in {self.where} is empty); drop --chat and write the prompt in "
                "the model's format, or quantize a checkpoint whose "
                "tokenizer_config.json has a chat_template"
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template, self.where)
        from jinja2.exceptions import TemplateError

        eos = min(self.eos_token_ids) if self.eos_token_ids else None
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_token_id),
                eos_token=self.token_text(eos),
            )
        except TemplateError as e:
            raise FormatError(
                f"{self.where}: tokenizer.chat_template failed to render ({e})"
            ) from e

    def decoder(self, context: Sequence[int] = ()) -> StreamDecoder:
        """A :class:`StreamDecoder` that continues after the tokens ``context``."""
        return StreamDecoder(self, context)


def _compile_template(source: str, where: str):
    """Compile a chat template the way transformers does (sandboxed, trim_blocks,
    lstrip_blocks, ``raise_exception``)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise FormatError(
            f"{where}: tokenizer.chat_template is not a valid Jinja2 template ({e})"
        ) from e


class StreamDecoder:
    """Turns generated tokens into text pieces as they come.

    Text is only emitted once it is complete: a token that ends inside a UTF-8
    character (byte-level tokenizers) or whose spacing depends on the next token
    is held back until decoding no longer ends in U+FFFD. Decoding starts a few
    tokens into ``context`` (the prompt) so that tokenizers which strip a
    leading space at the start of a text decode the first piece correctly.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.ids = list(context)[-self.CONTEXT :]
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        """Add a token; return the newly completed text (maybe empty)."""
        self.ids.append(int(token))
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""

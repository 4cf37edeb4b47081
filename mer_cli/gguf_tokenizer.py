"""Tokenizers between GGUF metadata (``tokenizer.ggml.*``) and HF ``tokenizer.json``.

llama.cpp stores a vocabulary as parallel arrays: ``tokens`` (strings),
``token_type`` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte),
``scores`` (SentencePiece models) and ``merges`` ("a b" strings, byte-level BPE
models). Two models cover the architectures mer runs:

* ``"llama"`` -- SentencePiece BPE with byte fallback (Mixtral). Merges are not
  stored; SentencePiece merges the adjacent pair whose concatenation has the
  highest score, so the merge list is rebuilt from the scores the way
  transformers' ``LlamaConverter`` does.
* ``"gpt2"`` -- byte-level BPE with merges (Qwen2/3-MoE, OLMoE); the
  pre-tokenizer regex is chosen by ``tokenizer.ggml.pre``.

:func:`tokenizer_from_gguf` builds a ``tokenizer.json`` and the store manifest's
tokenizer table from GGUF metadata; :func:`gguf_tokenizer_metadata` goes the other
way for :mod:`mer_cli.gguf_export`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mer_cli.errors import FormatError, UnsupportedError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"  # the "▁" SentencePiece uses for a space

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> split regex (None: GPT-2's,
# which ByteLevel applies itself)
GPT2_RE = None
QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_REGEX: dict[str, str | None] = {
    "gpt-2": GPT2_RE,
    "gpt2": GPT2_RE,
    "olmo": GPT2_RE,
    "qwen2": QWEN2_RE,
    "llama-bpe": LLAMA3_RE,
    "llama3": LLAMA3_RE,
}


# =================================================================== GGUF -> HF


def tokenizer_from_gguf(
    get: Callable[[str, Any], Any], where: str
) -> tuple[bytes, dict[str, Any]]:
    """Build ``tokenizer.json`` from a GGUF file's tokenizer metadata.

    Parameters
    ----------
    get
        ``get(key, default)`` returning a decoded metadata value (lists for arrays).
    where
        The file name, for messages.

    Returns
    -------
    (tokenizer_json, info)
        The ``tokenizer.json`` bytes and the manifest's tokenizer table
        ``{"file", "chat_template", "bos_token_id", "eos_token_ids", "add_bos_token"}``.
    """
    model = get("tokenizer.ggml.model", None)
    hf_json = get("tokenizer.huggingface.json", None)
    tokens = get("tokenizer.ggml.tokens", None)
    if hf_json is None and (model is None or tokens is None):
        raise FormatError(
            f"{where}: tokenizer.ggml.model / tokenizer.ggml.tokens are missing; the "
            "GGUF file has no tokenizer, convert it again with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    bos = _opt_int(get("tokenizer.ggml.bos_token_id", None))
    eos_ids = [
        i
        for key in ("eos", "eot", "eom")
        if (i := _opt_int(get(f"tokenizer.ggml.{key}_token_id", None))) is not None
    ]
    eos_ids = list(dict.fromkeys(eos_ids))
    add_bos = get("tokenizer.ggml.add_bos_token", None)
    add_eos = bool(get("tokenizer.ggml.add_eos_token", False))
    if add_bos is None:  # llama.cpp's defaults: SentencePiece adds BOS, BPE does not
        add_bos = model == "llama"
    add_bos = bool(add_bos) and bos is not None
    info = {
        "file": "tokenizer.json",
        "chat_template": get("tokenizer.chat_template", None),
        "bos_token_id": bos,
        "eos_token_ids": eos_ids,
        "add_bos_token": add_bos,
    }
    if hf_json is not None:  # the original tokenizer.json, embedded verbatim
        return hf_json.encode(), info

    n = len(tokens)
    types = get("tokenizer.ggml.token_type", None) or [NORMAL] * n
    if len(types) != n:
        raise FormatError(
            f"{where}: tokenizer.ggml.token_type has {len(types)} entries, expected "
            f"{n} (one per token)"
        )
    if model == "llama":
        scores = get("tokenizer.ggml.scores", None)
        if scores is None or len(scores) != n:
            raise FormatError(
                f"{where}: tokenizer.ggml.scores has "
                f"{'no' if scores is None else len(scores)} entries, expected {n}; "
                "a SentencePiece vocabulary needs one score per token"
            )
        unk = _opt_int(get("tokenizer.ggml.unknown_token_id", None))
        prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
        tok = _spm_tokenizer(tokens, scores, types, unk, prefix, where)
    elif model == "gpt2":
        # an empty merge list cannot be stored (GGUF arrays are non-empty): absent
        merges = get("tokenizer.ggml.merges", None) or []
        pre = get("tokenizer.ggml.pre", "default")
        tok = _bpe_tokenizer(tokens, merges, types, pre, where)
    else:
        raise UnsupportedError(
            f"{where}: tokenizer.ggml.model is {model!r}; mer reads 'llama' "
            "(SentencePiece BPE) and 'gpt2' (byte-level BPE) vocabularies"
        )
    _add_special_tokens(tok, tokens, types)
    _set_post_processor(tok, tokens, bos if add_bos else None, eos_ids, add_eos)
    return tok.to_str().encode(), info


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def spm_merges(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, str]]:
    """Merges equivalent to SentencePiece BPE scoring (transformers' extractor).

    Every split of a normal token into two vocabulary tokens is a merge, ranked by
    the merged token's score (highest first), ties by the pieces' ids.
    """
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, UNKNOWN)}
    found = []
    for piece, i in vocab.items():
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        found.extend(
            (-float(scores[i]), n, a, b) for n, (_, _, a, b) in enumerate(local)
        )
    found.sort(key=lambda m: m[0])  # stable: keeps the id order within a score
    return [(a, b) for _, _, a, b in found]


def _spm_tokenizer(tokens, scores, types, unk: int | None, prefix: bool, where: str):
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins
    unk_token = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    bpe = _bpe(
        where,
        models,
        vocab=vocab,
        merges=spm_merges(tokens, scores, types),
        unk_token=unk_token,
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(bpe)
    # llama.cpp prepends a space to the text and to each text run after a special
    # token; a normalizer runs on exactly those runs
    norm = [normalizers.Replace(" ", SPIECE_SPACE)]
    if prefix:
        norm.insert(0, normalizers.Prepend(SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(norm)
    steps = [
        decoders.Replace(SPIECE_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _bpe(where: str, models, **kw):
    """``tokenizers.models.BPE(**kw)``; its errors (plain ``Exception``) as ours."""
    try:
        return models.BPE(**kw)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises bare Exception
        raise FormatError(
            f"{where}: the tokenizer.ggml.* vocabulary is inconsistent ({e}); the "
            "file is corrupt, convert the model again"
        ) from e


def _bpe_tokenizer(tokens, merges, types, pre: str, where: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pt

    pairs = []
    for i, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise FormatError(
                f"{where}: tokenizer.ggml.merges[{i}] is {m!r}, expected two tokens "
                "separated by one space"
            )
        pairs.append((parts[0], parts[1]))
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    tok = Tokenizer(_bpe(where, models, vocab=vocab, merges=pairs, fuse_unk=False))
    if pre not in PRE_REGEX:
        warnings.warn(
            f"{where}: tokenizer.ggml.pre is {pre!r}, which mer does not know; using "
            "GPT-2's pre-tokenizer regex, so some texts may tokenize differently "
            "than in llama.cpp",
            stacklevel=3,
        )
    regex = PRE_REGEX.get(pre, GPT2_RE)
    if regex is None:
        tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pt.Sequence(
            [
                pt.Split(Regex(regex), behavior="isolated", invert=False),
                pt.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    # llama.cpp matches control, user-defined and unknown tokens in raw text
    added = [
        AddedToken(t, special=types[i] != USER_DEFINED, normalized=False)
        for i, t in enumerate(tokens)
        if types[i] in (CONTROL, USER_DEFINED, UNKNOWN) and t
    ]
    if added:
        tok.add_tokens(added)


def _set_post_processor(tok, tokens, bos: int | None, eos_ids, add_eos: bool) -> None:
    from tokenizers import processors

    eos = eos_ids[0] if add_eos and eos_ids else None
    if bos is None and eos is None:
        return
    head = [tokens[bos]] if bos is not None else []
    tail = [tokens[eos]] if eos is not None else []
    single = " ".join([*head, "$A", *tail])
    pair = " ".join([*head, "$A", *tail, *[t + ":1" for t in head], "$B:1"])
    pair += "".join(" " + t + ":1" for t in tail)
    specials = {tokens[i]: i for i in (bos, eos) if i is not None}
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(specials.items())
    )


# =================================================================== HF -> GGUF


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _find_split_regex(pre: Mapping[str, Any] | None) -> tuple[str | None, bool]:
    """The Split regex of a pre-tokenizer and whether ByteLevel uses GPT-2's."""
    if not pre:
        return None, False
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex, gpt2 = None, False
    for s in steps:
        if s.get("type") == "Split":
            pat = s.get("pattern", {})
            regex = pat.get("Regex") or (
                re.escape(pat["String"]) if "String" in pat else None
            )
        if s.get("type") == "ByteLevel" and s.get("use_regex", True):
            gpt2 = True
    return regex, gpt2


def gguf_tokenizer_metadata(
    hf_dir: str | Path, gguf_arch: str, vocab_size: int
) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF metadata llama.cpp's converter writes for ``hf_dir``.

    Reads ``tokenizer.json`` and, when present, ``tokenizer_config.json``,
    ``generation_config.json`` and ``config.json``. The token list is padded to
    ``vocab_size`` (the embedding's rows) with ``[PAD{i}]`` tokens of type unused,
    as the converter does.

    Returns
    -------
    dict
        GGUF key -> value; lists are arrays, ``bool``/``int``/``float``/``str``
        scalars (token ids are written as uint32 by the caller).
    """
    d = Path(hf_dir)
    tj = _read_json(d / "tokenizer.json")
    if tj is None:
        raise FormatError(
            f"{d}: tokenizer.json is missing; a GGUF file needs the tokenizer, copy "
            "it from the original checkpoint"
        )
    tc = _read_json(d / "tokenizer_config.json") or {}
    gc = _read_json(d / "generation_config.json") or {}
    cfg = _read_json(d / "config.json") or {}
    where = str(d / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(
            f"{where}: model.type is {model.get('type')!r}; mer writes GGUF "
            "vocabularies for BPE tokenizers only"
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    for content, a in added.items():
        vocab.setdefault(content, int(a["id"]))
    n = max(vocab_size, max(vocab.values()) + 1 if vocab else 0)
    tokens: list[str | None] = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    raw_merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    spm = bool(model.get("byte_fallback"))

    types, out_tokens = [], []
    for i, t in enumerate(tokens):
        if t is None:
            out_tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        out_tokens.append(t)
        if t == model.get("unk_token"):
            types.append(UNKNOWN)
        elif t in added:
            types.append(CONTROL if added[t].get("special") else USER_DEFINED)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(BYTE)
        else:
            types.append(NORMAL)

    meta: dict[str, Any] = {}
    if spm:
        # SentencePiece ranks merges by the merged token's score: the token made
        # by merge r gets score -r; tokens no merge makes score 0
        score = {}
        for r, m in enumerate(merges):
            a, b = m.split(" ", 1)
            score.setdefault(a + b, -float(r))
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.pre"] = "default"
        meta["tokenizer.ggml.tokens"] = out_tokens
        meta["tokenizer.ggml.scores"] = [
            score.get(t, 0.0) if ty == NORMAL else (-1000.0 if ty == UNUSED else 0.0)
            for t, ty in zip(out_tokens, types)
        ]
        meta["tokenizer.ggml.token_type"] = types
        meta["tokenizer.ggml.add_space_prefix"] = _adds_space_prefix(tj)
    else:
        regex, gpt2 = _find_split_regex(tj.get("pre_tokenizer"))
        pre = {QWEN2_RE: "qwen2", LLAMA3_RE: "llama-bpe"}.get(regex)
        if pre is None and regex is None and gpt2:
            pre = "olmo" if gguf_arch == "olmoe" else "gpt-2"
        if pre is None:
            warnings.warn(
                f"{where}: the pre-tokenizer matches none llama.cpp knows by name; "
                "writing tokenizer.ggml.pre = 'default'",
                stacklevel=2,
            )
            pre = "default"
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = pre
        meta["tokenizer.ggml.tokens"] = out_tokens
        meta["tokenizer.ggml.token_type"] = types
        meta["tokenizer.ggml.merges"] = merges

    ids = {t: i for i, t in enumerate(tokens) if t is not None}

    def tid(kind: str) -> int | None:
        v = _token_str(tc.get(f"{kind}_token"))
        if v is not None and v in ids:
            return ids[v]
        v = cfg.get(f"{kind}_token_id")
        return v if isinstance(v, int) else None

    bos, eos, unk, pad = tid("bos"), tid("eos"), tid("unk"), tid("pad")
    gen_eos = gc.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if eos is None and gen_eos:
        eos = gen_eos[0]
    for key, v in (("bos", bos), ("eos", eos), ("unknown", unk), ("padding", pad)):
        if v is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(v)
    others = [e for e in gen_eos if e != eos]
    if others:  # llama.cpp knows one more end token: end-of-turn
        meta["tokenizer.ggml.eot_token_id"] = int(others[0])
    add_bos, add_eos = _post_processor_adds(tj, tokens, bos, eos)
    add_bos = tc.get("add_bos_token", add_bos)
    add_eos = tc.get("add_eos_token", add_eos)
    if isinstance(add_bos, bool):
        meta["tokenizer.ggml.add_bos_token"] = add_bos
    if isinstance(add_eos, bool):
        meta["tokenizer.ggml.add_eos_token"] = add_eos
    tmpl = tc.get("chat_template")
    if isinstance(tmpl, list):  # [{"name", "template"}]: the default one
        tmpl = next(
            (t.get("template") for t in tmpl if t.get("name") == "default"), None
        )
    if isinstance(tmpl, str) and tmpl:
        meta["tokenizer.chat_template"] = tmpl
    return meta


def _adds_space_prefix(tj: Mapping[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends "▁" to the text."""
    norm = tj.get("normalizer") or {}
    steps = (
        norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    )
    if any(s.get("type") == "Prepend" for s in steps):
        return True
    pre = tj.get("pre_tokenizer") or {}
    psteps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(
        s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
        for s in psteps
    )


def _post_processor_adds(
    tj: Mapping[str, Any], tokens, bos: int | None, eos: int | None
) -> tuple[bool | None, bool | None]:
    """Whether the post-processor's single template starts with BOS / ends with EOS."""
    pp = tj.get("post_processor") or {}
    procs = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if single else None
            b = tokens[bos] if bos is not None else None
            e = tokens[eos] if eos is not None else None
            return (first is not None and first == b), (last is not None and last == e)
    return None, None

"""The committed transformers reference outputs used by the parity tests (no torch).

Each ``tests/fixtures/parity/<name>/`` is a tiny Hugging Face checkpoint
(``config.json``, float32 ``model.safetensors`` with per-expert names, tokenizer
files) plus ``reference.npz``, written by ``scripts/dev/make_parity_fixtures.py``
with torch and transformers; ``tests/fixtures/parity/README.md`` documents how.

Shapes legend: T = 16 prompt tokens, N = 16 generated tokens, V vocabulary
(``config.json`` ``vocab_size``), L layers, E experts, K active experts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PARITY_DIR = Path(__file__).resolve().parent / "fixtures" / "parity"

# name -> (dtype, shape legend) of every array in reference.npz
REFERENCE_ARRAYS: dict[str, tuple[str, str]] = {
    "input_ids": ("int64", "[T]"),
    "prompt_logits": ("float32", "[T, V]"),
    "greedy_tokens": ("int64", "[N]"),
    "decode_logits": ("float32", "[N, V]"),
    "routing": ("int64", "[L, T, K]"),
    "routing_weights": ("float32", "[L, T, K]"),
    "router_logits": ("float32", "[L, T, E]"),
    "decode_routing": ("int64", "[L, N-1, K]"),
}


def fixture_dirs() -> list[Path]:
    """Every fixture directory (one holding ``reference.npz``), sorted by name."""
    if not PARITY_DIR.is_dir():
        return []
    return sorted(p for p in PARITY_DIR.iterdir() if (p / "reference.npz").is_file())


def load_reference(directory: str | Path) -> dict[str, Any]:
    """The arrays of ``<directory>/reference.npz`` plus ``prompt_text``.

    Parameters
    ----------
    directory
        A fixture directory from :func:`fixture_dirs`.

    Returns
    -------
    dict
        ``input_ids`` int64 [T]: the prompt, ``<s>`` first.
        ``prompt_logits`` float32 [T, V]: transformers' forward of the prompt.
        ``greedy_tokens`` int64 [N]: ``generate(do_sample=False)`` with the KV cache.
        ``decode_logits`` float32 [N, V]: row i is the logits that chose
        ``greedy_tokens[i]`` (row 0 comes from the prompt's last position).
        ``routing`` int64 [L, T, K]: experts chosen for each prompt token, in
        descending router probability.
        ``routing_weights`` float32 [L, T, K]: their mixing weights.
        ``router_logits`` float32 [L, T, E]: raw router outputs for the prompt.
        ``decode_routing`` int64 [L, N-1, K]: experts chosen for the generated
        tokens fed back during decoding (the last one is never fed back).
        ``prompt_text`` str: text whose encoding is ``input_ids``.
    """
    with np.load(Path(directory) / "reference.npz", allow_pickle=False) as z:
        out: dict[str, Any] = {k: z[k] for k in z.files}
    out["prompt_text"] = str(out["prompt_text"])
    return out


def load_config(directory: str | Path) -> dict[str, Any]:
    """The fixture's ``config.json`` as a dict."""
    return json.loads((Path(directory) / "config.json").read_text())

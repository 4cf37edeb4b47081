"""Store writer and reader: alignment, checksums, manifest checks, atomic writes.

Data files are re-read here with plain ``open``/``seek`` and ``zlib.crc32``
rather than through ``Store``, so the reader is not its own reference.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mer_cli.cli import cli
from mer_cli.errors import FormatError, UsageError
from mer_cli.formats import quant
from mer_cli.formats.store import Store, StoreWriter
from mer_cli.models.config import ModelConfig

CFG = ModelConfig(
    arch="mixtral",
    vocab_size=64,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    num_experts=3,
    top_k=2,
    expert_ffn=96,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position=128,
)
TOK = {
    "file": "tokenizer.json",
    "chat_template": None,
    "bos_token_id": 1,
    "eos_token_ids": [2],
    "add_bos_token": True,
}


def expert_weights(layer: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 * layer + e)
    D, F = CFG.hidden_size, CFG.expert_ffn
    return (
        rng.standard_normal((2 * F, D), dtype=np.float32),
        rng.standard_normal((D, F), dtype=np.float32),
    )


def write_store(path: Path, experts="q4", max_file_size=None, force=False) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(
        path,
        CFG,
        expert_dtype=experts,
        dense_dtype="q8",
        tokenizer=TOK,
        source={"kind": "test"},
        force=force,
        max_file_size=max_file_size,
    ) as w:
        emb = rng.standard_normal((64, 64), dtype=np.float32)
        w.add_dense("embed", quant.encode(emb, "q8"), "q8", emb.shape)
        norm = rng.standard_normal(64, dtype=np.float32)
        w.add_dense("final_norm", quant.encode(norm, "f32"), "f32", norm.shape)
        for layer in range(CFG.num_layers):
            for e in range(CFG.num_experts):
                gu, dn = expert_weights(layer, e)
                w.add_expert(
                    layer,
                    e,
                    {
                        "gate_up": quant.encode(gu, experts),
                        "down": quant.encode(dn, experts),
                    },
                )
        w.add_file("tokenizer.json", b'{"fake": true}')
        return w.commit()


@pytest.fixture
def store(tmp_path) -> Path:
    return write_store(tmp_path / "s.mer")


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


# ------------------------------------------------------------------ layout


def test_every_extent_is_4096_aligned_with_its_recorded_checksum(store):
    m = manifest(store)
    assert m["format"] == "mer-store" and m["version"] == 1
    assert len(m["experts"]) == CFG.num_layers * CFG.num_experts
    ext = m["expert_layout"]["nbytes"]
    assert ext % 4096 == 0
    for part in m["expert_layout"]["parts"].values():
        assert part["offset"] % 64 == 0
    for e in m["experts"]:
        assert e["offset"] % 4096 == 0 and e["nbytes"] == ext
        path = store / m["files"][e["file"]]["path"]
        with open(path, "rb") as f:
            f.seek(e["offset"])
            data = f.read(e["nbytes"])
        assert len(data) == ext
        assert zlib.crc32(data) == e["crc32"]
    for name, d in m["dense"].items():
        assert d["offset"] % 64 == 0
        with open(store / m["files"][d["file"]]["path"], "rb") as f:
            f.seek(d["offset"])
            assert zlib.crc32(f.read(d["nbytes"])) == d["crc32"], name
    # every data file starts with the documented header and has the recorded size
    sid = bytes.fromhex(m["store_id"])
    for i, f in enumerate(m["files"]):
        raw = (store / f["path"]).read_bytes()
        assert len(raw) == f["nbytes"]
        assert struct.unpack("<8sII16s", raw[:32]) == (b"MERDATA\0", 1, i, sid)
        assert not any(raw[32:4096])
    assert [f["path"] for f in m["files"]] == [
        "dense.bin",
        "experts-00001-of-00001.bin",
    ]
    assert m["tokenizer"] == TOK
    assert (store / "tokenizer.json").read_bytes() == b'{"fake": true}'


def test_reader_returns_the_written_values(store):
    s = Store.open(store)
    assert s.model == CFG
    for layer in range(CFG.num_layers):
        for e in range(CFG.num_experts):
            gu, dn = expert_weights(layer, e)
            parts = s.expert_parts(s.expert_bytes(layer, e))
            np.testing.assert_array_equal(
                parts["gate_up"].dequantize(),
                quant.view(quant.encode(gu, "q4"), "q4", gu.shape).dequantize(),
            )
            assert parts["down"].shape == (CFG.hidden_size, CFG.expert_ffn)
    assert s.tensor_f32("final_norm").shape == (64,)
    assert s.verify() == []


def test_f32_experts_round_trip_exactly(tmp_path):
    s = Store.open(write_store(tmp_path / "f.mer", experts="f32"))
    gu, dn = expert_weights(1, 2)
    parts = s.expert_parts(s.expert_bytes(1, 2))
    np.testing.assert_array_equal(parts["gate_up"], gu)
    np.testing.assert_array_equal(parts["down"], dn)


def test_max_file_size_spreads_extents(tmp_path):
    ext = quant.align(
        quant.align(quant.tensor_nbytes("q4", (192, 64)), 64)
        + quant.tensor_nbytes("q4", (64, 96)),
        4096,
    )
    s = Store.open(write_store(tmp_path / "m.mer", max_file_size=4096 + 2 * ext))
    assert s.extent_nbytes == ext
    assert len(s.file_paths) == 1 + 3  # dense + 6 extents two per file
    assert s.verify() == []
    with pytest.raises(UsageError, match="smaller than one expert extent"):
        write_store(tmp_path / "n.mer", max_file_size=ext)


# ------------------------------------------------------------------ verify


def test_verify_reports_a_corrupted_byte_naming_file_and_expert(store):
    m = manifest(store)
    e = m["experts"][4]  # layer 1, expert 1
    path = store / m["files"][e["file"]]["path"]
    with open(path, "r+b") as f:
        f.seek(e["offset"] + 1000)
        b = f.read(1)
        f.seek(e["offset"] + 1000)
        f.write(bytes([b[0] ^ 0x40]))
    problems = Store.open(store).verify()
    assert problems == [
        f"{path}: expert (layer 1, expert 1) = experts[4] at offset {e['offset']} "
        f"fails its checksum (crc32 {e['crc32']:08x}); the file is corrupt, re-run "
        "mer quantize"
    ]
    r = CliRunner().invoke(cli, ["verify", str(store), "-q"])
    assert r.exit_code == 1
    assert f"problem: {problems[0]}" in r.output
    assert "1 problem(s) found" in r.output


def test_verify_reports_a_corrupted_dense_tensor(store):
    m = manifest(store)
    d = m["dense"]["embed"]
    path = store / "dense.bin"
    raw = bytearray(path.read_bytes())
    raw[d["offset"] + 7] ^= 1
    path.write_bytes(bytes(raw))
    (p,) = Store.open(store).verify()
    assert p.startswith(
        f"{path}: dense tensor embed at offset {d['offset']} fails its checksum"
    )


# ------------------------------------------------------------------ bad manifests


def edit(store: Path, fn) -> None:
    m = manifest(store)
    fn(m)
    (store / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format="gguf"), "format is 'gguf', expected 'mer-store'; not a mer store"),
        (lambda m: m.update(version=2), "version is 2, this mer reads version 1; upgrade mer (pip install -U mer-cli) or re-run mer quantize"),
        (lambda m: m.pop("experts"), "field 'experts' is missing; re-run mer quantize"),
        (lambda m: m["experts"][3].update(offset=1000 + 4096), "experts[3].offset is 5096, expected a multiple of 4096 past the header; re-run mer quantize"),
        (lambda m: m["experts"][3].update(offset="4096"), "experts[3].offset is '4096', expected a whole number >= 0; re-run mer quantize"),
        (lambda m: m["experts"][0].update(file=7), "experts[0].file is 7, expected 0..1"),
        (lambda m: m["experts"][0].pop("crc32"), "experts[0].crc32 is None, expected a whole number >= 0"),
        (lambda m: m["experts"].pop(), "experts table has 5 entries, expected 6; first missing (1, 2)"),
        (lambda m: m["expert_layout"].update(nbytes=4096), "expert_layout.nbytes is 4096, expected"),
        (lambda m: m["expert_layout"]["parts"]["down"].update(offset=0), "expert_layout.parts is"),
        (lambda m: m["dense"]["embed"].update(dtype="q3"), "dense['embed'].dtype is 'q3', expected one of f32, f16, bf16, q8, q4"),
        (lambda m: m["dense"]["embed"].update(nbytes=10), "dense['embed'].nbytes is 10, expected"),
        (lambda m: m["dense"]["embed"].update(shape="64x64"), "dense['embed'].shape is '64x64', expected a list of positive integers"),
        (lambda m: m["files"][1].update(nbytes=5), "experts[0] ends at"),
        (lambda m: m["quantization"].pop("experts"), "quantization.experts is None, expected one of"),
        (lambda m: m["model"].pop("hidden_size"), "model is missing hidden_size; re-run mer quantize"),
        (lambda m: m.update(dense=[]), "dense is a list, expected a dict"),
    ],
    ids=lambda x: x if isinstance(x, str) and len(x) < 40 else None,
)  # fmt: skip
def test_bad_manifest_fields_give_the_documented_messages(store, change, message):
    edit(store, change)
    with pytest.raises(FormatError) as e:
        Store.open(store)
    assert str(e.value).startswith(f"{store / 'manifest.json'}: ")
    assert message in str(e.value)
    r = CliRunner().invoke(cli, ["verify", str(store), "-q"])
    assert r.exit_code == 1 and message in r.output


def test_data_file_problems(tmp_path):
    a, b = write_store(tmp_path / "a.mer"), write_store(tmp_path / "b.mer")
    shutil.copy(b / "dense.bin", a / "dense.bin")
    with pytest.raises(FormatError) as e:
        Store.open(a)
    assert str(e.value).startswith(f"{a / 'dense.bin'}: header says file 0 of store ")
    assert "a data file from another store was copied in" in str(e.value)
    experts = b / "experts-00001-of-00001.bin"
    size = experts.stat().st_size
    with open(experts, "r+b") as f:
        f.truncate(8192)
    with pytest.raises(FormatError) as e:
        Store.open(b)
    assert str(e.value) == (
        f"{experts}: size is 8192 bytes, manifest files[1].nbytes says {size}; "
        "the file is truncated or replaced, re-run mer quantize"
    )
    experts.unlink()
    with pytest.raises(FormatError, match="data file missing"):
        Store.open(b)
    (b / "manifest.json").write_text("{oops")
    with pytest.raises(FormatError, match="not valid JSON"):
        Store.open(b)
    (b / "manifest.json").unlink()
    with pytest.raises(FormatError, match=r"not a mer store \(no manifest.json\)"):
        Store.open(b)
    with pytest.raises(FormatError, match="no such store"):
        Store.open(tmp_path / "nothing")


# ------------------------------------------------------------------ atomic writes


def test_existing_output_is_refused_without_force(store, tmp_path):
    before = manifest(store)["store_id"]
    with pytest.raises(UsageError) as e:
        write_store(store)
    assert str(e.value) == (
        f"{store}: output already exists; choose another -o or pass --force to replace it"
    )
    assert e.value.exit_code == 2
    write_store(store, force=True)
    assert manifest(store)["store_id"] != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mer"]


def test_an_exception_inside_the_writer_leaves_nothing(tmp_path):
    out = tmp_path / "x.mer"
    with pytest.raises(RuntimeError):
        with StoreWriter(out, CFG, tokenizer=TOK) as w:
            gu, dn = expert_weights(0, 0)
            w.add_expert(
                0,
                0,
                {"gate_up": quant.encode(gu, "q4"), "down": quant.encode(dn, "q4")},
            )
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_an_incomplete_store(tmp_path):
    with pytest.raises(
        ValueError, match="6 experts were never added, first \\(0, 0\\)"
    ):
        with StoreWriter(tmp_path / "y.mer", CFG) as w:
            w.commit()
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_sizes(tmp_path):
    with StoreWriter(tmp_path / "z.mer", CFG) as w:
        with pytest.raises(ValueError, match="expected 4352"):
            w.add_dense("embed", np.zeros(10, np.uint8), "q8", (64, 64))
        with pytest.raises(ValueError, match="expert part gate_up"):
            w.add_expert(
                0, 0, {"gate_up": np.zeros(3, np.uint8), "down": np.zeros(3, np.uint8)}
            )


def test_a_killed_writers_temporary_directory_is_removed_by_the_next(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".s.mer.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "experts-00001.part").write_bytes(b"x" * 100)
    alive = tmp_path / f".s.mer.tmp-{os.getppid()}"  # a live process: kept
    alive.mkdir()
    write_store(tmp_path / "s.mer")
    assert not stale.exists() and alive.is_dir()

"""The plain file I/O under every module: atomic writes, JSON and YAML."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain import fileio


def test_atomic_write_text_and_cleanup_on_interrupt(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "a" / "r.json"
    fileio.atomic_write(target, lambda f: f.write('{"x": 1}\n'), mode="w")
    assert target.read_text(encoding="utf-8") == '{"x": 1}\n'
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    synced = []
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: synced.append(fd))
    fileio.atomic_write(target, lambda f: f.write("{}"), mode="w")
    assert len(synced) == 2  # the file, then its folder

    def interrupted(f):
        f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(target, interrupted, mode="w")
    assert target.read_text(encoding="utf-8") == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]
    with pytest.raises(ValueError, match="mode must be"):
        fileio.atomic_write(target, lambda f: None, mode="a")
    with pytest.raises(OSError):
        fileio.atomic_write(tmp_path / "missing" / "x", lambda f: None, make_parents=False)


def test_write_json_atomic_holds_tensor_and_numpy_scalars(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "results.json"
    fileio.write_json_atomic({"a": np.float32(0.5), "b": torch.tensor(3), "c": [1, "x"]}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 0.5, "b": 3, "c": [1, "x"]}
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert fileio.jsonable(float("nan")) == "nan" and fileio.jsonable(np.arange(2)) == [0, 1]


def test_yaml_reads_the_core_schema_and_writes_what_it_reads(tmp_path: Path) -> None:
    read = fileio.yaml_load("a: 1_000\nb: 1:30\nc: no\nd: 1e-3\ne: .inf\n")
    assert read == {"a": "1_000", "b": "1:30", "c": "no", "d": 1e-3, "e": float("inf")}
    data = {"z": "1e-3", "a": [1, 2], "s": "010"}
    with open(tmp_path / "x.yaml", "w", encoding="utf-8") as f:
        fileio.yaml_dump(data, f)
    text = (tmp_path / "x.yaml").read_text(encoding="utf-8")
    assert fileio.yaml_load(text) == data and list(fileio.yaml_load(text)) == ["z", "a", "s"]

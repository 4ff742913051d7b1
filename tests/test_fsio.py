"""``gradlens.fsio``: atomic writes leave the old file or the new one, JSON files fail in one line naming the file,
and a safetensors file's framing is checked before anything is read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from gradlens.errors import GradlensError
from gradlens.fsio import atomic_write, json_dump, read_json, safetensors_header, safetensors_metadata


def one_line_error(match: str, fn, *args) -> str:
    with pytest.raises(GradlensError) as err:
        fn(*args)
    message = str(err.value)
    assert match in message and len(message.splitlines()) == 1, message
    return message


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_text("old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]

    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_json_dump_round_trips_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    obj = {"runs": [{"path": "a", "seed": 1}], "x": 0.25, "none": None}
    json_dump(obj, path)
    assert read_json(path) == obj and path.read_text() == json.dumps(obj, indent=1) + "\n"
    json_dump([1, 2], path)
    assert read_json(path) == [1, 2]


def test_read_json_errors_name_the_file_and_the_cause(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert one_line_error("", read_json, missing, "provenance") == f"{missing}: provenance file does not exist"
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n')
    assert one_line_error(f"{bad}: cannot read JSON file (", read_json, bad).endswith(")")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    one_line_error(f"{binary}: cannot read JSON file", read_json, binary)


def save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    safetensors.numpy.save_file(tensors, str(path))
    return path


def test_the_header_of_a_good_file_is_returned(tmp_path: Path) -> None:
    tensors = {"a": np.zeros((3, 4), np.float32), "b": np.ones(5, np.int64)}
    path = save(tmp_path / "t.safetensors", tensors)
    header = safetensors_header(path, "test")
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert header == json.loads(raw[8:8 + n])  # the header as written, parsed independently
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"} == {
        "a": ("F32", [3, 4]), "b": ("I64", [5])}


def test_bad_framing_is_refused_unread(tmp_path: Path) -> None:
    path = save(tmp_path / "t.safetensors", {"a": np.arange(6, dtype=np.float32)})
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])

    def variant(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    one_line_error("test file missing", safetensors_header, tmp_path / "absent.safetensors", "test")
    one_line_error("truncated test file (3 bytes)", safetensors_header, variant("short", raw[:3]), "test")
    one_line_error("truncated or corrupt test file", safetensors_header, variant("cut", raw[:-1]), "test")
    one_line_error("truncated or corrupt test file", safetensors_header, variant("long", raw + b"\0"), "test")
    one_line_error(f"header length {2**40} bytes is absurd", safetensors_header,
                   variant("absurd", struct.pack("<Q", 2**40) + b"{}"), "test")
    one_line_error("truncated test file (header needs", safetensors_header,
                   variant("pickle", b"\x80\x04\x95" + b"\0" * 64), "test")  # a pickle's opcodes as a length
    one_line_error(f"truncated test file (header needs {8 + len(raw)} bytes, file has {len(raw)})",
                   safetensors_header, variant("overlong", struct.pack("<Q", len(raw)) + raw[8:]), "test")
    one_line_error("header is not valid JSON", safetensors_header,
                   variant("garbled", raw[:8] + b"!" + raw[9:]), "test")
    header["a"]["shape"] = [7]  # 28 bytes of float32, while its offsets span 24
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: the data stays in place
    one_line_error("'a' has 24 bytes, not 28", safetensors_header, variant("shape", raw[:8] + text + raw[8 + n:]),
                   "test")


def test_safetensors_metadata_keeps_strings_encodes_the_rest_and_names_the_file_when_it_cannot() -> None:
    meta = safetensors_metadata({"method": "sign", "k": 12, "budget": {"share": 0.01}}, "m.safetensors", "mask")
    assert meta == {"method": "sign", "k": "12", "budget": json.dumps({"share": 0.01})}
    with pytest.raises(GradlensError, match=r"^m\.safetensors: mask metadata is not JSON-serialisable") as e:
        safetensors_metadata({"obj": object()}, "m.safetensors", "mask")
    assert "\n" not in str(e.value)

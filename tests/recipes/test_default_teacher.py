"""The default teacher's conversion cache: keyed by the GGUF's content, one entry kept."""

import os

import pytest

from nemo_neo.recipes import default_teacher


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF and a converter that only records its calls (the real one takes ~30 s)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    calls = []

    def convert(src, out, overwrite):
        calls.append(src)
        out.mkdir(parents=True)
        (out / "nemo_neo.json").write_text("{}")

    monkeypatch.setenv("NEMO_NEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_teacher, "gguf_path", lambda: gguf)
    monkeypatch.setattr(default_teacher, "convert_hf_to_neo", convert)
    return gguf, calls


def test_reinstall_with_same_content_reuses_the_conversion(fake_gguf):
    gguf, calls = fake_gguf
    first = default_teacher.default_teacher_checkpoint()
    os.utime(gguf, (1, 1))  # a reinstall: same bytes, new mtime
    assert default_teacher.default_teacher_checkpoint() == first
    assert len(calls) == 1


def test_new_content_replaces_the_old_entry(fake_gguf):
    gguf, calls = fake_gguf
    first = default_teacher.default_teacher_checkpoint()
    gguf.write_bytes(gguf.read_bytes() + b"v2")
    second = default_teacher.default_teacher_checkpoint()
    assert second != first and len(calls) == 2
    assert sorted(p.name for p in second.parent.iterdir()) == [second.name]

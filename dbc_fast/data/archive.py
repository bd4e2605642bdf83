"""Unpacking .tar/.tar.gz dataset archives once into a cache directory.

The cache lives in $DBC_FAST_CACHE (or ~/.cache/dbc_fast). Each archive gets its own folder keyed by the
archive's absolute path, modification time and size, so a changed archive is unpacked again and an
unchanged one never is. Unpacking goes into a temporary folder beside the target that is renamed into
place when complete (atomic on one file system); a lock file serialises concurrent unpackers (DataLoader
workers, torchrun ranks, parallel test processes).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from ..errors import DatasetError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def cache_dir() -> Path:
    """The folder archives are unpacked into ($DBC_FAST_CACHE, else ~/.cache/dbc_fast)."""
    env = os.environ.get("DBC_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dbc_fast"


def is_archive(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return os.path.isfile(path) and name.endswith(ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def unpack_archive(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """Unpack `path` (once) and return the folder holding its contents."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise DatasetError(f"cannot read archive: {e.strerror}", path) from e
    key = hashlib.sha1(f"{path}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{_archive_stem(path)}-{key}"
    if target.is_dir():
        return target
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=root))
        try:
            with tarfile.open(path) as tar:
                _extract_safely(tar, tmp)
            os.rename(tmp, target)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DatasetError(f"cannot unpack archive (corrupt or truncated?): {e}", path) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _extract_safely(tar: tarfile.TarFile, dest: Path) -> None:
    """Extracts refusing absolute paths, paths out of `dest`, links and device files.

    Python >= 3.11.4 (and 3.8-3.10 security releases) does this with the "data" filter; older ones get the
    same refusals checked here before a plain extract.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    base = os.path.realpath(dest)
    for member in tar.getmembers():
        target = os.path.realpath(os.path.join(base, member.name))
        if os.path.isabs(member.name) or os.path.commonpath([base, target]) != base:
            raise tarfile.TarError(f"member {member.name!r} would be written outside the unpack folder")
        if not (member.isfile() or member.isdir()):
            raise tarfile.TarError(f"member {member.name!r} is a link or special file")
    tar.extractall(dest)


def dataset_root(unpacked: Path) -> Path:
    """The archive's single top-level folder if it has exactly one (e.g. `tiny-imagenet-mini/`), else the
    unpack folder itself. Only one level: `my_ilsvrc/train/...` gives `my_ilsvrc`, not `train`."""
    entries = [e for e in Path(unpacked).iterdir() if not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return Path(unpacked)


def resolve_root(root: str | os.PathLike) -> Path:
    """A dataset root as a folder: archives are unpacked into the cache first."""
    root = Path(root).expanduser()
    if is_archive(root):
        return dataset_root(unpack_archive(root))
    if not root.exists():
        raise DatasetError("dataset root does not exist", root)
    if not root.is_dir():
        raise DatasetError("dataset root must be a folder or a .tar/.tar.gz/.tgz archive", root)
    return root

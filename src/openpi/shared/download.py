"""Fetch checkpoints and assets from local paths or remote URLs (gs://, s3://, https://, memory://) into a cache.

`maybe_download` returns a local `pathlib.Path`:

* A local path (or a ``file://`` URL) is returned as is; nothing is copied.
* A remote URL is copied (a single file or a whole directory tree) into the cache directory
  (``$OPENPI_DATA_HOME``, default ``~/.cache/openpi``) under ``<netloc>/<path>``, and later calls reuse the copy.

Downloads are atomic: the data goes to a temporary directory next to the target and is renamed into place only when
complete, under a file lock, so parallel processes neither clash nor see half-written data. ``gs://`` uses anonymous
access (the openpi buckets are public) through gcsfs, which is an optional extra and imported lazily.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import posixpath
import shutil
import tempfile
import urllib.parse

import filelock
import fsspec

logger = logging.getLogger(__name__)

ENV_CACHE_DIR = "OPENPI_DATA_HOME"
DEFAULT_CACHE_DIR = "~/.cache/openpi"

# fsspec implementations that need a package beyond fsspec itself, and how to get it.
_EXTRA_PACKAGES = {
    "gs": ("gcsfs", "pip install 'openpi-latents[gcs]'  (or, in this repo: uv sync --extra gcs)"),
    "gcs": ("gcsfs", "pip install 'openpi-latents[gcs]'  (or, in this repo: uv sync --extra gcs)"),
    "s3": ("s3fs", "pip install s3fs"),
    "http": ("aiohttp", "pip install aiohttp"),
    "https": ("aiohttp", "pip install aiohttp"),
}


def get_cache_dir() -> pathlib.Path:
    """The download cache: ``$OPENPI_DATA_HOME`` if set, else ``~/.cache/openpi``."""
    return pathlib.Path(os.environ.get(ENV_CACHE_DIR, DEFAULT_CACHE_DIR)).expanduser()


def is_remote(url_or_path: str | os.PathLike) -> bool:
    """True for URLs that must be downloaded (any scheme except ``file``); False for local paths."""
    scheme = urllib.parse.urlparse(str(url_or_path)).scheme
    # A one-letter "scheme" is a Windows drive letter, not a URL.
    return len(scheme) > 1 and scheme != "file"


def local_cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where `maybe_download` puts (or has put) the copy of `url`: ``<cache_dir>/<netloc>/<path>``."""
    parsed = urllib.parse.urlparse(url)
    rel = posixpath.normpath(f"{parsed.netloc}/{parsed.path.strip('/')}".strip("/"))
    if rel in ("", ".") or rel.startswith("..") or "/../" in f"/{rel}/":
        raise ValueError(f"Cannot derive a cache location from URL {url!r}: give a URL with a bucket/host and a path.")
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else get_cache_dir()
    return root / rel


def maybe_download(
    url_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, force: bool = False
) -> pathlib.Path:
    """Return a local path for `url_or_path`, downloading it into the cache first if it is a remote URL.

    Args:
        url_or_path: a local path, a ``file://`` URL, or a remote URL (``gs://``, ``s3://``, ``https://``, or any
            fsspec protocol such as ``memory://``). A remote directory is copied recursively.
        cache_dir: the cache root; default ``$OPENPI_DATA_HOME`` or ``~/.cache/openpi``.
        force: download again even if a cached copy exists (the old copy is replaced atomically).

    Raises:
        FileNotFoundError: the local path or remote object does not exist.
        ImportError: the filesystem for the URL's scheme needs a package that is not installed (e.g. gcsfs).
    """
    text = os.fspath(url_or_path)
    if not is_remote(text):
        path = pathlib.Path(urllib.parse.urlparse(text).path if text.startswith("file://") else text).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Local path {path} does not exist. Check the path, or pass a gs:// URL to download."
            )
        return path

    local_path = local_cache_path(text, cache_dir)
    if local_path.exists() and not force:
        return local_path

    local_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(local_path.parent / f".{local_path.name}.lock"))
    with lock:
        # Another process may have finished the download while this one waited for the lock.
        if local_path.exists() and not force:
            return local_path
        fs, remote_root = _filesystem_for(text)
        tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{local_path.name}.tmp-", dir=local_path.parent))
        try:
            staged = tmp_dir / local_path.name
            _copy_remote(fs, remote_root, staged, url=text)
            if local_path.exists():  # force=True: replace the old copy.
                old = tmp_dir / f"{local_path.name}.old"
                os.replace(local_path, old)
            os.replace(staged, local_path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("Downloaded %s to %s", text, local_path)
    return local_path


def _filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the URL's path in that filesystem's terms."""
    scheme = urllib.parse.urlparse(url).scheme
    fs = _make_filesystem(scheme)
    return fs, fs._strip_protocol(url)  # fsspec's public-in-practice path normaliser


def _make_filesystem(scheme: str) -> fsspec.AbstractFileSystem:
    if scheme in _EXTRA_PACKAGES:
        package, how = _EXTRA_PACKAGES[scheme]
        if importlib.util.find_spec(package) is None:
            raise ImportError(
                f"Reading {scheme}:// URLs needs the optional package {package!r}, which is not installed: {how}"
            )
    if scheme in ("gs", "gcs"):
        # The openpi buckets are public: anonymous access, no credentials needed.
        return fsspec.filesystem(scheme, token="anon")
    return fsspec.filesystem(scheme)


def _copy_remote(fs: fsspec.AbstractFileSystem, remote_root: str, target: pathlib.Path, *, url: str) -> None:
    """Copy a remote file, or every file under a remote directory, to `target`."""
    if not fs.exists(remote_root):
        raise FileNotFoundError(f"Remote object {url} does not exist. Check the URL (bucket and path).")
    if not fs.isdir(remote_root):
        fs.get_file(remote_root, str(target))
        return
    files = fs.find(remote_root, withdirs=False, detail=False)
    target.mkdir(parents=True)
    root = remote_root.rstrip("/")
    for remote_file in files:
        rel = posixpath.relpath(remote_file, root)
        if rel.startswith(".."):
            raise RuntimeError(f"Unexpected file {remote_file!r} outside {root!r} while copying {url}.")
        dest = target.joinpath(*rel.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote_file, str(dest))

"""JAX's persistent compilation cache for the command-line tools (``--jax-cache-dir``) and the test session.

Compiling the model is most of a short run's start-up (the tiny preset on 2 CPU cores: ~16 s to compile the first
inference, ~2-3 s to load it from the cache); with a cache directory a second run, and every env / Ray worker of the
same run, loads the compiled programs instead. JAX itself reads ``JAX_COMPILATION_CACHE_DIR`` at import; `configure`
adds the explicit flag, creates the directory, and exports it so that subprocesses (env workers, Ray workers) share it.
The cache is trusted code: do not point it at a directory other users can write to.
"""

from __future__ import annotations

import os
import pathlib
import sys

ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


class CacheDirError(ValueError):
    """The cache directory cannot be created or is not a directory; the message names the flag and the fix."""


def configure(cache_dir: str | os.PathLike[str] | None = None, *, flag: str = "--jax-cache-dir") -> pathlib.Path | None:
    """Caches compiled programs in `cache_dir` (default: ``$JAX_COMPILATION_CACHE_DIR``); returns it (None: neither).

    Creates the directory and exports it as ``JAX_COMPILATION_CACHE_DIR``, which JAX reads when it is imported (here or
    in a worker process started later); a JAX already imported is pointed at it (also after something was compiled:
    the cache is re-opened at the new place). Does not import JAX. A path that cannot be a directory is a
    CacheDirError (a ValueError) naming `flag`.
    """
    if cache_dir is None or str(cache_dir) == "":
        cache_dir = os.environ.get(ENV_VAR) or None
        if cache_dir is None:
            return None
    path = pathlib.Path(cache_dir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheDirError(
            f"{flag} {str(cache_dir)!r} cannot be used as a cache directory ({e}); pass a writable directory."
        ) from None
    os.environ[ENV_VAR] = str(path)  # read by JAX when it is imported, here or in a worker process
    if "jax" in sys.modules:  # already imported: point it at the new place
        from jax.experimental.compilation_cache import compilation_cache

        if sys.modules["jax"].config.jax_compilation_cache_dir != str(path):
            compilation_cache.set_cache_dir(str(path))
            compilation_cache.reset_cache()  # an already opened cache would otherwise keep writing to the old place
    return path

"""Process-wide settings that every command-line entry point makes first (``lzn_jax.main``, ``lzn_jax.tools.*``,
``lzn_jax.experiments.*``); a library user's own program is left as it is."""

from __future__ import annotations

import logging
import os
import pathlib


def quiet_library_logs() -> None:
    """Only warnings from the libraries (clu, orbax, absl): a command's own progress lines and reports stay readable."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def enable_compilation_cache() -> None:
    """Compiled programs are cached on disk (``$LZN_COMPILATION_CACHE``, default ``~/.cache/lzn_jax/xla``; an empty
    string switches the cache off), so a resumed or repeated run skips the minute-long CPU compiles."""
    import jax

    directory = os.environ.get("LZN_COMPILATION_CACHE", str(pathlib.Path.home() / ".cache" / "lzn_jax" / "xla"))
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)

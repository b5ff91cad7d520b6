"""One way to mute the ML libraries a backend calls into.

transformers and diffusers log warnings (unused config keys, torchvision fallbacks) and draw
tqdm load bars; a backend never prints (its events are the output), so both backends and
their tiny-model builders wrap loading and rendering in `quiet()`. The libraries are
imported inside the call, so importing this module costs nothing and pulls in neither
torch nor jax; the JAX backend names only transformers (diffusers would import torch).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet(libraries: tuple[str, ...] = ("transformers", "diffusers"), *,
          future_warnings: bool = True) -> Iterator[None]:
    """Errors only and no progress bars from `libraries` while inside; their settings are
    put back on the way out. future_warnings=False also drops FutureWarnings (diffusers'
    deprecation notices about arguments we keep for older versions)."""
    saved = []
    for name in libraries:
        log = importlib.import_module(name).logging
        saved.append((log, log.get_verbosity(), log.is_progress_bar_enabled()))
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        with contextlib.ExitStack() as stack:
            if not future_warnings:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for log, level, bars in saved:
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()

"""Backends: found through the `textinv.backends` entry-point group, loaded lazily.

Listing entry points imports nothing; a backend's module (and torch or jax with it) is
imported only when that backend is asked for. A plugin that fails to import is reported
with the reason and never breaks other commands. Tests register a backend in-process
with `register()`, the way simonw/llm's tests do, without installing a package.

What a backend provides is engine.contract.Backend (probe, sample, and a training Session
the core's run engine drives); BackendInfo is what probe() returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

from .contract import Backend, BackendInfo
from ..errors import BackendError

GROUP = "textinv.backends"

# What to install for the backends we know about; a third-party backend brings its own.
INSTALL_HINTS = {
    "torch": 'pip install "textinv[torch]"  (CPU: pip install torch==2.13.0 first)',
    "jax": 'pip install "textinv[jax]"',
}


_registered: dict[str, Callable[[], Any]] = {}


def register(name: str, factory: Callable[[], Any]) -> None:
    """Register a backend in-process (tests, embedding apps). `factory()` returns the backend."""
    _registered[name] = factory


def unregister(name: str) -> None:
    _registered.pop(name, None)


@contextlib.contextmanager
def registered(name: str, factory: Callable[[], Any]):
    register(name, factory)
    try:
        yield
    finally:
        unregister(name)


@dataclass
class Candidate:
    """A backend we know of, loaded or not."""

    name: str
    source: str  # "entry point module:attr" or "in-process"
    distribution: str = ""
    _load: Callable[[], Any] | None = None

    def load(self) -> Backend:
        """Import and instantiate. Any failure becomes BackendError with what to do."""
        try:
            obj = self._load()
            backend = obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "probe")) else obj
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            hint = INSTALL_HINTS.get(self.name, f"Reinstall the package that provides the {self.name!r} backend.")
            raise BackendError(f"The {self.name} backend cannot load: {missing} is not installed.",
                               f"Install it: {hint}") from e
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break textinv
            raise BackendError(f"The {self.name} backend failed to load: {type(e).__name__}: {e}",
                               f"Reinstall or remove the package providing it ({self.source}).") from e
        if not hasattr(backend, "probe"):
            raise BackendError(f"The {self.name} backend ({self.source}) does not provide probe/train/sample.")
        return backend


def candidates() -> list[Candidate]:
    """Every backend we can see, without importing any of them."""
    found: dict[str, Candidate] = {}
    try:
        eps = metadata.entry_points(group=GROUP)
    except Exception:  # noqa: BLE001 - a broken metadata dir must not break the CLI
        eps = []
    for ep in eps:
        dist = getattr(getattr(ep, "dist", None), "name", "") or ""
        found.setdefault(ep.name, Candidate(ep.name, ep.value, dist, ep.load))
    for name, factory in _registered.items():
        found[name] = Candidate(name, "in-process", "", lambda f=factory: f())
    # Prefer torch, then jax, then the rest by name: the order `train` picks a default in.
    order = {"torch": 0, "jax": 1}
    return sorted(found.values(), key=lambda c: (order.get(c.name, 2), c.name))


def preferring(first: str | None = None) -> list[Candidate]:
    """candidates(), with the one named `first` (the --backend choice) moved to the front."""
    return sorted(candidates(), key=lambda c: c.name != first)


def probe_all() -> list[BackendInfo]:
    """Load each backend and ask it; failures are reported, not raised."""
    infos = []
    for cand in candidates():
        try:
            info = cand.load().probe()
        except BackendError as e:
            info = BackendInfo(cand.name, available=False, reason=str(e))
        except Exception as e:  # noqa: BLE001
            info = BackendInfo(cand.name, available=False, reason=f"probe failed: {type(e).__name__}: {e}")
        infos.append(info)
    return infos


def _none_installed() -> BackendError:
    hints = "; ".join(f"{n}: {h}" for n, h in INSTALL_HINTS.items())
    return BackendError("No training/sampling backend is installed (textinv backends lists none).",
                        f"Install one — {hints}.")


def require_backend(name: str | None = None) -> Backend:
    """The backend to train/sample with: the named one, else the first usable one."""
    cands = candidates()
    if not cands:
        raise _none_installed()
    if name is not None:
        for cand in cands:
            if cand.name == name:
                backend = cand.load()
                info = backend.probe()
                if not info.available:
                    raise BackendError(f"The {name} backend is installed but unusable: {info.reason}",
                                       "Run `textinv backends` for details.")
                return backend
        raise BackendError(f"No backend named {name!r}. Installed: {', '.join(c.name for c in cands)}.",
                           INSTALL_HINTS.get(name, "Pick one of the installed backends with --backend."))
    reasons = []
    for cand in cands:
        try:
            backend = cand.load()
            info = backend.probe()
        except BackendError as e:
            reasons.append(str(e).splitlines()[0])
            continue
        if info.available:
            return backend
        reasons.append(f"{cand.name}: {info.reason}")
    raise BackendError("No usable backend: " + "; ".join(reasons), "Run `textinv backends` for details.")

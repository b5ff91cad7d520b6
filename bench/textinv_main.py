"""`python -m bench.textinv_main ARGS` is `textinv ARGS` where textinv is importable (PYTHONPATH
holding the repo and backends/) but not pip-installed, as on the benchmark's GPU machine: there
the backends' entry points do not exist, so they are registered in-process here."""

from __future__ import annotations

from textinv_cli.engine import plugins
from textinv_cli.cli.app import main


def _backend(module: str, cls: str):
    def make():
        return getattr(__import__(module, fromlist=[cls]), cls)()
    return make


if __name__ == "__main__":
    known = {c.name for c in plugins.candidates()}
    for name, module, cls in (("torch", "textinv_torch.backend", "TorchBackend"),
                              ("jax", "textinv_jax.backend", "JaxBackend")):
        if name not in known:
            plugins.register(name, _backend(module, cls))
    main()

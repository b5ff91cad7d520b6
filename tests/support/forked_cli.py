"""A warm parent for many short `textinv` processes: it imports torch, diffusers and the CLI
once, then forks one child per request, and each child runs the CLI's own main() -- what
`python -m textinv_cli ARGS` runs -- in a process of its own, which a test may SIGKILL.
A dozen training processes then cost one start-up (~6 s of imports on a small machine)
instead of a dozen.

    python tests/support/forked_cli.py         requests on stdin, one JSON line each:
                                        {"argv": ["train", ...], "env": {"NAME": "value"}}

On stdout, per request and in this order: {"forked": PID} (written by the child), the child's
own stdout (the CLI's --json events), then {"exited": PID, "status": S} from the parent, S < 0
meaning killed by signal -S. Children run one at a time; their stderr is this process's.
Start it with OMP_NUM_THREADS=1: the children then all compute with the same thread count
(bit-identical results), and the parent never starts a thread pool a fork could not copy.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _warm_up() -> None:
    """Everything a training child would import; nothing that runs a kernel or starts a thread."""
    import sqlite3  # noqa: F401

    import diffusers  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401
    import pydantic  # noqa: F401
    import rich.console  # noqa: F401
    import rich.progress  # noqa: F401
    import torch  # noqa: F401
    from diffusers import (AutoencoderKL, DDPMScheduler, DEISMultistepScheduler,  # noqa: F401
                           DPMSolverSinglestepScheduler, UniPCMultistepScheduler, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import textinv_cli.cli.app  # noqa: F401
    import textinv_torch.backend  # noqa: F401
    import textinv_torch.trainer  # noqa: F401


def _child(argv: list[str], env: dict) -> None:
    code = 70
    try:
        os.environ.update(env)
        print(json.dumps({"forked": os.getpid()}), flush=True)
        from textinv_cli.cli.app import main

        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, never return into the parent's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    _warm_up()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child([str(a) for a in req["argv"]], {k: str(v) for k, v in (req.get("env") or {}).items()})
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exited": pid, "status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()

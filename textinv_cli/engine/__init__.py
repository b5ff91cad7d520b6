"""The run engine and the backend contract, shared by every backend.

    contract.py  Backend, Session, BackendInfo: what a backend gives the core, typed
    checks.py    every option rule and limit, checked before anything loads
    loop.py      the run protocol (run folder, resume, events, checkpoints, Ctrl-C), once
    stop.py      the Ctrl-C flag the loop reads after each step

Importing it imports neither torch nor jax.
"""

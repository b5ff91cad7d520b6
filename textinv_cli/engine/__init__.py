"""The run engine and the backend contract, shared by every backend.

    contract.py  Backend, Session, BackendInfo: what a backend gives the core, typed
    spec.py      TrainSpec, SampleRequest, Event: what crosses the backend boundary
    checks.py    every option rule and limit, checked before anything loads
    loop.py      the run protocol (run folder, resume, events, checkpoints, Ctrl-C), once
    plugins.py   backends found through the `textinv.backends` entry points

and what a run is made of (run folder, launch, batches, captions, images, schedules): one
line each in ARCHITECTURE.md. Importing it imports neither torch nor jax.
"""

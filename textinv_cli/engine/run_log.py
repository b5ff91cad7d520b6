"""A run read back from its folder, and its events as lines of text.

events.jsonl is the run's record (run_files.record_event); everything `textinv runs` shows and
the training-end summary's losses come from it, so they agree. train.log is the same events
as one line of text each (written by the run engine, loop.py), for `tail -f` and for
people reading a run that trained with --json or without a terminal.

A resumed run repeats the steps after its checkpoint: its `started` event names the step it
continued from, and readings of later steps from before that are dropped (`curve`), so the
curve is the one the final embedding went through.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .run_files import EVENTS
from .runs import running_pid

LOG_FILE = "train.log"
MAX_EVENTS_BYTES = 64 * 1024 * 1024  # a run of a million steps logs well under this


def read_events(run: Path) -> list[dict]:
    """The run's events, oldest first; a torn or damaged line (a killed process) is skipped."""
    path = Path(run) / EVENTS
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_EVENTS_BYTES)
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("event"), str):
            out.append(ev)
    return out


@dataclass
class Curve:
    """The run's loss readings [(step, loss)] and eval readings, the resumed parts spliced."""

    loss: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def curve(events: list[dict]) -> Curve:
    c = Curve()
    for ev in events:
        kind, step = ev.get("event"), ev.get("step")
        if kind == "started":
            start = ev.get("start_step") if isinstance(ev.get("start_step"), int) else 0
            c.loss = [r for r in c.loss if r[0] <= start]  # redone after the checkpoint it resumed from
            c.eval = [r for r in c.eval if r[0] <= start]
        elif kind in ("progress", "eval") and isinstance(step, int) and _number(ev.get("loss")) is not None:
            (c.loss if kind == "progress" else c.eval).append((step, _number(ev["loss"])))
    return c


@dataclass
class RunInfo:
    """What `textinv runs` shows of one run folder."""

    path: Path
    status: str                      # finished | interrupted | running | failed | new
    step: int = 0
    total: int | None = None
    token: str | None = None
    name: str | None = None          # the registry name it was to get (spec)
    started: float | None = None     # first event's time (epoch seconds)
    updated: float | None = None     # last event's time
    seconds: float | None = None     # time spent training, summed over its sessions
    last_loss: float | None = None
    eval_first: float | None = None
    eval_last: float | None = None
    pid: int | None = None           # running: the process
    embedding: str | None = None     # finished: the final embedding file
    error: str | None = None         # failed: what ended it, as recorded (loop._Watch.failed)
    validation: list[str] = field(default_factory=list)
    curve: Curve = field(default_factory=Curve)

    def to_json(self) -> dict:
        return {"run": str(self.path), "status": self.status, "step": self.step, "total": self.total,
                "token": self.token, "name": self.name, "started": self.started, "updated": self.updated,
                "seconds": self.seconds, "last_loss": self.last_loss, "eval_first": self.eval_first,
                "eval_last": self.eval_last, "pid": self.pid, "embedding": self.embedding, "error": self.error,
                "validation": self.validation}


def run_info(run: Path, spec: dict | None = None) -> RunInfo:
    """Status and numbers of the run folder `run` (spec: its spec.json, already read)."""
    run = Path(run)
    events = read_events(run)
    spec = spec or {}
    extra = spec.get("extra") if isinstance(spec.get("extra"), dict) else {}
    info = RunInfo(path=run, status="new", token=_text(spec.get("token")), name=_text(extra.get("name")),
                   total=spec.get("steps") if isinstance(spec.get("steps"), int) else None)
    c = info.curve = curve(events)
    times = [t for t in (ev.get("time") for ev in events) if _number(t) is not None]
    info.started, info.updated = (times[0], times[-1]) if times else (None, None)
    info.seconds = _training_seconds(events)
    terminal = None
    for ev in events:
        kind = ev.get("event")
        if isinstance(ev.get("step"), int) and kind in ("progress", "finished", "interrupted"):
            info.step = ev["step"]
        if kind == "started":
            terminal = None
            info.step = ev.get("start_step") if isinstance(ev.get("start_step"), int) else info.step
            if isinstance(ev.get("total_steps"), int):
                info.total = ev["total_steps"]
        elif kind in ("finished", "interrupted", "failed"):
            terminal = kind
            info.error = _text(ev.get("error")) if kind == "failed" else None
            if kind == "finished" and isinstance(ev.get("embedding_path"), str):
                info.embedding = ev["embedding_path"]
        elif kind == "validation" and isinstance(ev.get("paths"), list):
            info.validation += [p for p in ev["paths"] if isinstance(p, str)]
    info.pid = running_pid(run)
    if info.pid is not None:
        info.status = "running"
    elif terminal:
        info.status = terminal
    elif events or (run / "checkpoints").is_dir():
        info.status = "failed"  # started, never finished nor interrupted, and no process holds it
    info.last_loss = c.loss[-1][1] if c.loss else None
    if c.eval:
        info.eval_first, info.eval_last = c.eval[0][1], c.eval[-1][1]
    return info


def _text(v) -> str | None:
    return v if isinstance(v, str) else None


def _training_seconds(events: list[dict]) -> float | None:
    """Each session's time from its `started` event to its last event, summed."""
    total, begin, last = 0.0, None, None
    for ev in events:
        t = _number(ev.get("time"))
        if t is None:
            continue
        if ev.get("event") == "started":
            if begin is not None and last is not None:
                total += max(0.0, last - begin)
            begin = t
        last = t
    if begin is not None and last is not None:
        total += max(0.0, last - begin)
    return round(total, 3) if begin is not None else None


# -- events as text: train.log, and the progress lines when stderr is not a terminal ----------

def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def summary_lines(d: dict) -> list[str]:
    """The training-end summary (the `finished` event's "summary") as text."""
    parts = [f"Done: {d.get('steps')} steps in {duration(d.get('seconds'))} ({d.get('steps_per_s', 0):.2f} steps/s)"]
    if d.get("final_loss") is not None:
        mean = f", mean {d['mean_loss']:.4f}" if d.get("mean_loss") is not None else ""
        parts.append(f"loss {d['final_loss']:.4f} at the end{mean}")
    if d.get("eval_first") is not None:
        parts.append(f"eval loss {d['eval_first']:.4f} -> {d['eval_last']:.4f} "
                     f"(steps {d.get('eval_first_step')} -> {d.get('eval_last_step')})")
    lines = ["; ".join(parts) + "."]
    where = f"Run folder: {d.get('run_dir')}"
    if d.get("log_file"):
        where += f" (log: {d['log_file']})"
    lines.append(where)
    if d.get("tensorboard"):
        lines.append(f"TensorBoard: tensorboard --logdir {d['tensorboard']}")
    return lines


def text_line(ev: dict) -> str | None:
    """One event as one line of text (summary: several, joined); None for events not logged
    as text (progress without a loss reading)."""
    kind, step, total = ev.get("event"), ev.get("step"), ev.get("total")
    if kind == "started":
        resumed = f", resumed from step {ev.get('start_step')}" if ev.get("start_step") else ""
        return (f"started: {ev.get('images')} images, {ev.get('total_steps')} steps on {ev.get('device')} "
                f"({ev.get('family')}, {ev.get('model')}){resumed}; run folder {ev.get('run_dir')}")
    if kind == "progress":
        if _number(ev.get("loss")) is None:
            return None
        lr = f"  lr {ev['lr']:.2e}" if _number(ev.get("lr")) is not None else ""
        return f"step {step}/{total}  loss {ev['loss']:.4f}{lr}"
    if kind == "eval":
        return f"step {step}  eval loss {ev.get('loss'):.4f} ({ev.get('samples')} fixed samples)"
    if kind in ("checkpoint", "snapshot"):
        return f"{kind} at step {step}: {ev.get('path')}"
    if kind == "validation":
        return f"validation images at step {step}: " + ", ".join(map(str, ev.get("paths") or []))
    if kind == "warning":
        return f"warning: {ev.get('message')}"
    if kind == "interrupted":
        return f"interrupted at step {step}; checkpoint {ev.get('checkpoint')}"
    if kind == "failed":
        return f"failed after step {step}: {ev.get('error')}"
    if kind == "finished":
        told = summary_lines(ev["summary"]) if isinstance(ev.get("summary"), dict) else []
        return "\n".join([f"finished at step {step}: {ev.get('embedding_path')}", *told])
    return None


def log_line(ev: dict) -> str | None:
    """text_line with the local time in front, for train.log."""
    text = text_line(ev)
    if text is None:
        return None
    from ..untrusted import escape

    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.get("time") or time.time()))
    return "".join(f"{stamp} {escape(line)}\n" for line in text.split("\n"))

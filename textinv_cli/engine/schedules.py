"""Learning-rate schedules, as pure functions of the step (so resume needs only the step).

constant, warmup (linear warm-up then constant), cosine and linear (decay to 0 after the
warm-up), and A1111's step schedule "0.005:100, 1e-3:1000, 1e-5": each rate holds until
its step; a last rate without a step holds to the end.
"""

from __future__ import annotations

import math

from ..errors import OptionError, TextinvError

NAMED = ("constant", "warmup", "cosine", "linear")


def parse_steps(text: str) -> list[tuple[float, int | None]]:
    """'0.005:100, 1e-3:1000' -> [(0.005, 100), (0.001, 1000)]; raises with what is wrong."""
    pieces = [p.strip() for p in text.split(",") if p.strip()]
    out: list[tuple[float, int | None]] = []
    last_end = 0
    for i, piece in enumerate(pieces):
        rate_s, _, end_s = piece.partition(":")
        try:
            rate = float(rate_s)
            end = int(end_s) if end_s.strip() else None
        except ValueError:
            raise TextinvError(f"Bad learning-rate schedule piece {piece!r}.",
                               'Write it as A1111 does: "0.005:100, 1e-3:1000, 1e-5".') from None
        if rate <= 0 or not math.isfinite(rate):
            raise TextinvError(f"Learning rate {rate_s} in the schedule must be positive.")
        if end is None and i != len(pieces) - 1:
            raise TextinvError(f"Only the last schedule piece may leave out its step ({piece!r}).")
        if end is not None and end <= last_end:
            raise TextinvError(f"Schedule steps must increase ({piece!r} after step {last_end}).")
        last_end = end or last_end
        out.append((rate, end))
    if not out:
        raise TextinvError("The learning-rate schedule is empty.")
    return out


def validate(schedule: str) -> None:
    if schedule not in NAMED:
        if ":" not in schedule and "," not in schedule:
            raise OptionError(f"Unknown --lr-schedule {schedule!r}.",
                               f"Use one of {', '.join(NAMED)}, or an A1111 schedule like \"0.005:100, 1e-3:1000\".")
        parse_steps(schedule)


def lr_at(step: int, *, base_lr: float, schedule: str = "constant", total_steps: int = 1,
          warmup_steps: int = 0) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if schedule not in NAMED:
        for rate, end in parse_steps(schedule):
            if end is None or step < end:
                return rate
        return parse_steps(schedule)[-1][0]
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule in ("constant", "warmup"):
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

"""How a run is watched: the options' rules (check_watching: --eval-every, --log-every,
--report-to) and `--report-to tensorboard`: the run's scalars (loss, lr, eval loss) as TensorBoard event
files in run/tensorboard, as diffusers' and kohya's scripts write them.

An extra dependency, never required: `pip install tensorboard` (with torch installed,
torch.utils.tensorboard writes the files) or `pip install tensorboardX` (no torch needed).
Checked before anything loads (check_report_to), so a missing package costs no time.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

from ..errors import OptionError, TextinvError

REPORT_TO = ("tensorboard",)
TENSORBOARD_DIR = "tensorboard"


def _writer_class():
    """SummaryWriter from torch.utils.tensorboard (needs torch and tensorboard) or tensorboardX;
    None when neither is installed."""
    if importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("torch") is not None:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    if importlib.util.find_spec("tensorboardX") is not None:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    return None


def _have_writer() -> bool:
    return ((importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("torch") is not None)
            or importlib.util.find_spec("tensorboardX") is not None)


def check_watching(spec) -> None:
    """--eval-every, --log-every and --report-to in range, the writer installed: before anything loads."""
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not whole(spec.eval_every) or spec.eval_every < 0:
        raise OptionError(f"--eval-every must be 0 or more, not {spec.eval_every!r}.", "0 turns the eval loss off.")
    if spec.log_every is not None and (not whole(spec.log_every) or spec.log_every < 1):
        raise OptionError(f"--log-every must be at least 1, not {spec.log_every!r}.",
                          "Leave it out for about 50 readings per run.")
    check_report_to(list(spec.report_to or []))


def check_report_to(report_to: list[str]) -> None:
    """Known names, and their package installed."""
    for target in report_to:
        if target not in REPORT_TO:
            raise OptionError(f"--report-to {shlex.quote(str(target))} is not a known target; one of "
                              f"{', '.join(REPORT_TO)}.", "Leave --report-to out, or pass --report-to tensorboard.")
    if "tensorboard" in report_to and not _have_writer():
        package = "tensorboard" if importlib.util.find_spec("torch") is not None else "tensorboardX"
        raise TextinvError("--report-to tensorboard needs the TensorBoard writer, which is not installed.",
                           f"Install it: {shlex.quote(sys.executable)} -m pip install {package}")


class Reporter:
    """Scalars to TensorBoard from the run's events (one writer per run, main process only)."""

    def __init__(self, run: Path, report_to: list[str]):
        self.writer, self.log_dir = None, None
        if "tensorboard" in report_to:
            cls = _writer_class()
            if cls is None:  # checked before the run started; uninstalled since
                check_report_to(report_to)
            self.log_dir = Path(run) / TENSORBOARD_DIR
            self.writer = cls(log_dir=str(self.log_dir))

    def event(self, kind: str, data: dict) -> None:
        if self.writer is None:
            return
        step = data.get("step")
        if kind == "progress":
            self.writer.add_scalar("train/lr", data["lr"], step)
            if data.get("loss") is not None:
                self.writer.add_scalar("train/loss", data["loss"], step)
        elif kind == "eval":
            self.writer.add_scalar("eval/loss", data["loss"], step)
        elif kind in ("finished", "interrupted"):
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

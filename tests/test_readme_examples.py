"""The README's shell examples, read from README.md at test time and run exactly as written.

Only the environment is provided: a temporary working folder holding what the examples name
(`./cat` and `./style` images, `./sd15` as the tiny SD 1.x model in diffusers layout, an A1111
install in `~/stable-diffusion-webui` whose checkpoint and VAE files hold tiny models, the
example files `charturner.pt`, `xl.safetensors`, `two-tokens.safetensors`,
`flux-lora.safetensors`, `t5-only.safetensors`), HOME (for `~/...`), TEXTINV_HOME, and the
registry entries the examples use (`cat-toy`, `<my-style>`), trained here for one step.

- Every `textinv` line runs in this process (one torch import for all), its words split as the
  shell splits them (shlex; `~/` expanded like the shell's tilde), and must exit 0.
- Except the long ones: `train` and `resume` (the README's 3000 and 2000 steps take minutes on
  a CPU) and `sample --size 768x512` (minutes with the tiny model on a CPU) run until the backend
  reports their first step, then get a real Ctrl-C (SIGINT to this process): they must have
  started as written and stop with exit 130 (training: with the resume command).
  `resume runs/cat-toy-20261126-214005` resumes the first train example's run, kept under that name.
- Skipped, with the reason recorded: `make` lines (they install packages) and `pull`/`push`
  (they need the real Hugging Face Hub).

The test prints which examples ran and which were skipped (pytest -s shows it).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RESUME_RUN = re.compile(r"^textinv resume (runs/\S+)")


@dataclass
class Example:
    line: int
    text: str

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def readme_examples(text: str) -> list[Example]:
    """Every command line of the README's indented code blocks (backslash continuations joined,
    comments dropped by shlex); lines that are not commands (the layout tree) are left out."""
    lines = text.splitlines()
    found: list[Example] = []
    in_block = False
    pending, start = "", 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            in_block = True if not pending else in_block
            continue
        indented = line.startswith("    ")
        if not indented:
            in_block = False
            continue
        if not in_block:
            continue
        body = line[4:]
        if not pending:
            if body.lstrip().startswith("#"):
                continue
            start = i
        pending += body.strip() if pending else body
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        words = shlex.split(pending, comments=True)
        if words and words[0] in ("textinv", "make"):
            found.append(Example(start, pending.strip()))
        pending = ""
    return found


def test_the_readme_parser_finds_the_examples():
    examples = readme_examples(README.read_text(encoding="utf-8"))
    texts = [e.text for e in examples]
    assert any(t.startswith("textinv train ./cat") and "--validate-every" in t for t in texts)  # continuation joined
    assert any(t.startswith("make demo") for t in texts)
    assert all(not t.startswith("textinv_cli") for t in texts)
    assert len(examples) >= 20


# -- the environment the examples assume ---------------------------------------------------------

def _lora_with_bundle(path: Path, name: str, parts: dict) -> None:
    from textinv_cli.formats.safetensors_io import dump_safetensors

    tensors = {f"lora_unet_down_blocks_{i}_attn.lora_down.weight": np.full((4, 8), i, np.float16) for i in range(2)}
    tensors.update({f"bundle_emb.{name}.{part}": arr for part, arr in parts.items()})
    path.write_bytes(dump_safetensors(tensors, None))


def _example_files(work: Path, tiny_model) -> None:
    from safetensors.numpy import save_file

    from textinv_cli import formats
    from textinv_cli.models.demo_images import write_demo_images
    from tests.support.family_embeddings import family_embedding
    from tests.support.helpers import random_embedding

    write_demo_images(work / "cat", n=4, size=64)
    write_demo_images(work / "style", n=4, size=64)
    shutil.copytree(tiny_model("sd1"), work / "sd15")
    formats.write_embedding(random_embedding("charturner", seed=1), work / "charturner.pt", "a1111")
    formats.write_embedding(random_embedding("<xl>", family="sdxl", seed=2), work / "xl.safetensors", "kohya")
    rng = np.random.default_rng(3)
    save_file({t: rng.standard_normal((1, 768)).astype(np.float32) for t in ("<a>", "<b>")},
              str(work / "two-tokens.safetensors"))
    _lora_with_bundle(work / "flux-lora.safetensors", "my-style",
                      {"clip_l": rng.standard_normal((2, 768)).astype(np.float32),
                       "t5": rng.standard_normal((2, 4096)).astype(np.float32)})
    t5 = family_embedding("<t5>", family="flux", slots=("t5",), seed=4)
    formats.write_embedding(t5, work / "t5-only.safetensors", "onetrainer")
    (work / "home").mkdir()
    _a1111_install(work / "home" / "stable-diffusion-webui" / "models", tiny_model)


def _a1111_install(models: Path, tiny_model) -> None:
    """The README's ~/stable-diffusion-webui: its checkpoint and VAE file names, holding the tiny
    models in the original (LDM) layout (tests/support/ldm_writer.py), so those examples run."""
    from tests.support.ldm_writer import write_ldm_checkpoint, write_ldm_vae

    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "VAE").mkdir()
    write_ldm_checkpoint(tiny_model("sd1"), models / "Stable-diffusion" / "v1-5-pruned-emaonly.safetensors")
    write_ldm_checkpoint(tiny_model("sd2"), models / "Stable-diffusion" / "v2-1_768-ema-pruned.safetensors")
    write_ldm_vae(tiny_model("sd1"), models / "VAE" / "vae-ft-mse-840000-ema-pruned.safetensors")


LONG_SAMPLE_PIXELS = 512 * 512  # a sample larger than this takes minutes on the tiny model on a CPU


def _long(words: list[str]) -> bool:
    if words[1] in ("train", "resume"):
        return True
    if words[1] == "sample" and "--size" in words:
        from textinv_cli.engine.checks import parse_size

        w, h = parse_size(words[words.index("--size") + 1])
        return w * h > LONG_SAMPLE_PIXELS
    return False


@pytest.fixture
def ctrl_c_at_first_step(monkeypatch):
    """Every backend's train/sample events are watched; at the first `progress` event this
    process gets SIGINT, as from a terminal's Ctrl-C. Yields a switch (set: armed)."""
    from textinv_cli.engine import plugins

    armed = {"on": False}
    real = plugins.require_backend

    class Watched:
        def __init__(self, backend):
            self._backend = backend

        def __getattr__(self, name):
            return getattr(self._backend, name)

        def _watch(self, events):
            sent = False
            for event in events:
                if armed["on"] and not sent and getattr(event, "kind", None) == "progress":
                    sent = True
                    os.kill(os.getpid(), signal.SIGINT)
                yield event

        def train(self, *a, **k):
            return self._watch(self._backend.train(*a, **k))

        def sample(self, *a, **k):
            return self._watch(self._backend.sample(*a, **k))

    monkeypatch.setattr(plugins, "require_backend", lambda *a, **k: Watched(real(*a, **k)))
    return armed


def _shell_words(example: Example, home: Path) -> list[str]:
    """The shell's word splitting and tilde expansion (the lines use no other expansion)."""
    return [str(home) + w[1:] if w.startswith("~/") else w for w in example.words]


def test_readme_examples_run_as_written(cli, tiny_model, tmp_path, monkeypatch, capsys, ctrl_c_at_first_step):
    examples = readme_examples(README.read_text(encoding="utf-8"))
    work = tmp_path / "work"
    work.mkdir()
    _example_files(work, tiny_model)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work / "home"))
    home = work / "home"

    ran, skipped = [], []
    first_run: Path | None = None
    registered = False
    for example in examples:
        words = example.words
        if words[0] == "make":
            skipped.append(f"line {example.line} (installs packages with pip): {example.text}")
            continue
        if words[1] in ("pull", "push"):
            skipped.append(f"line {example.line} (needs the Hugging Face Hub): {example.text}")
            continue
        training = words[1] in ("train", "resume")
        if not training and not registered:
            # the registry the other examples use, as finished trainings would have left it
            for args in (["train", "./cat", "--token", "<cat-toy>", "--init", "toy", "--model", "./sd15",
                          "--steps", "1"],
                         ["train", "./style", "--token", "<my-style>", "--init", "painting", "--steps", "1"]):
                r = cli(*args)
                assert r.exit_code == 0, r.output
            registered = True
        resumed = RESUME_RUN.match(example.text)
        if resumed:  # the README's example run: the first train example's run, under that name
            assert first_run is not None
            if not (work / resumed.group(1)).exists():
                first_run.rename(work / resumed.group(1))
        existing = set((work / "runs").glob("*")) if (work / "runs").is_dir() else set()
        long = _long(words)
        ctrl_c_at_first_step["on"] = long
        began = time.monotonic()
        try:
            r = cli(*_shell_words(example, home)[1:])
        finally:
            ctrl_c_at_first_step["on"] = False
        took = time.monotonic() - began
        where = f"README line {example.line}: {example.text}\nexit {r.exit_code}\n{r.output}"
        assert "" not in [line.strip() for line in r.stderr.splitlines()], f"a blank line on stderr: {where}"
        if long:
            assert r.exit_code == 130, where
            if training:
                assert "textinv resume" in r.output, where
            new = set((work / "runs").glob("*")) - existing if (work / "runs").is_dir() else set()
            if first_run is None and words[1] == "train" and new:
                first_run = new.pop()
            ran.append(f"line {example.line} ({took:.1f} s, until its first step, then Ctrl-C): {example.text}")
        else:
            assert r.exit_code == 0, where
            ran.append(f"line {example.line} ({took:.1f} s): {example.text}")

    with capsys.disabled():
        print(f"\nREADME examples run ({len(ran)}):", *ran, f"skipped ({len(skipped)}):", *skipped, sep="\n  ")
    assert len(ran) >= 20

"""The CLI speaks the dialects people bring: diffusers', kohya's and A1111's option names as
hidden aliases (cli/aliases.py), one help style with every choice listed (cli/usage.py), -h,
--version, shell completion, and usage errors in our words with exit 2 (app.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer

from textinv_cli.cli import aliases
from textinv_cli.cli.app import app
from textinv_cli.errors import TextinvError


class Captured(TextinvError):
    pass


@pytest.fixture
def spec_of(cli, monkeypatch, tmp_path):
    """spec_of(*train args) -> the TrainSpec train built (caught at its check, before any work)."""
    from textinv_cli.engine import checks

    seen = {}

    def capture(spec, *a, **k):
        seen["spec"] = spec
        raise Captured("captured")

    monkeypatch.setattr(checks, "check_train_spec", capture)

    def run(*args):
        r = cli("train", *args)
        assert "spec" in seen, r.output
        assert r.exit_code == 1
        return seen.pop("spec")

    return run


@pytest.fixture
def request_of(cli, monkeypatch):
    """request_of(*sample args) -> the SampleRequest sample built."""
    from textinv_cli.engine import checks

    seen = {}

    def capture(request, *a, **k):
        seen["request"] = request
        raise Captured("captured")

    monkeypatch.setattr(checks, "check_sample_request", capture)

    def run(*args):
        r = cli("sample", *args)
        assert "request" in seen, r.output
        return seen.pop("request")

    return run


def test_diffusers_training_options_are_ours(spec_of, tmp_path):
    # diffusers' README line for line (dashes or underscores, `=` or a separate value)
    spec = spec_of("--train_data_dir", str(tmp_path), "--learnable_property=style", "--placeholder_token=<cat-toy>",
                   "--initializer_token=toy", "--resolution=64", "--train_batch_size=2",
                   "--gradient_accumulation_steps=4", "--max_train_steps=7", "--learning_rate=5.0e-04", "--scale_lr",
                   "--lr_scheduler=cosine", "--lr_warmup_steps=3", "--output_dir", str(tmp_path / "out"),
                   "--num_vectors", "2", "--mixed_precision", "bf16", "--checkpointing_steps", "5",
                   "--checkpoints_total_limit", "3", "--save_steps", "4", "--validation_prompt", "a <cat-toy>",
                   "--validation_steps", "6", "--adam_weight_decay", "0.01", "--adam_epsilon", "1e-7",
                   "--enable_xformers_memory_efficient_attention", "--seed", "9")
    assert spec.data_dir == str(tmp_path.resolve())
    assert (spec.property, spec.token, spec.init, spec.resolution) == ("style", "<cat-toy>", ["toy"], 64)
    assert (spec.batch_size, spec.grad_accum, spec.steps, spec.lr, spec.scale_lr) == (2, 4, 7, 5e-4, True)
    assert (spec.lr_schedule, spec.warmup_steps, spec.vectors, spec.precision) == ("cosine", 3, 2, "bf16")
    assert (spec.checkpoint_every, spec.keep_checkpoints, spec.save_every) == (5, 3, 4)
    assert (spec.validate, spec.validate_every, spec.weight_decay, spec.adam_eps) == (["a <cat-toy>"], 6, 0.01, 1e-7)
    assert (spec.attention, spec.seed) == ("xformers", 9)


def test_kohya_training_options_are_ours(spec_of, tmp_path):
    spec = spec_of(str(tmp_path), "--token_string", "mytok", "--init_word", "toy figure", "--num_vectors_per_token", "3",
                   "--use_style_template", "--max_train_steps", "11", "--learning-rate", "1e-3",
                   "--save_every_n_steps", "5", "--sdpa", "--max_grad_norm", "1.0", "--gradient_checkpointing")
    assert (spec.token, spec.init, spec.vectors, spec.property) == ("mytok", ["toy", "figure"], 3, "style")
    assert (spec.steps, spec.lr, spec.save_every, spec.attention) == (11, 1e-3, 5, "sdpa")
    assert (spec.max_grad_norm, spec.gradient_checkpointing) == (1.0, True)


def test_sampling_options_of_diffusers_a1111_and_kohya(request_of, tmp_path):
    r = request_of("a <x>", "--num_inference_steps", "12", "--guidance_scale", "4.5", "--negative_prompt", "blurry",
                   "--num_images_per_prompt", "3", "--width", "768", "--height", "512", "--output_dir", str(tmp_path))
    assert (r.steps, r.guidance, r.negative, r.n, r.width, r.height) == (12, 4.5, "blurry", 3, 768, 512)
    assert r.out_dir == str(tmp_path)
    r = request_of("a <x>", "--cfg-scale=6", "--negative-prompt", "--cfg-scale", "--sampler-name", "euler",
                   "--height=640", "--width=384")
    # a value that looks like an alias stays a value
    assert (r.guidance, r.negative, r.scheduler, r.width, r.height) == (6.0, "--cfg-scale", "euler", 384, 640)
    r = request_of("a <x>", "--W", "256", "--H", "128", "--scale", "3", "--images_per_prompt", "2")
    assert (r.width, r.height, r.guidance, r.n) == (256, 128, 3.0, 2)


def test_nothing_after_a_double_dash_is_translated(request_of):
    r = request_of("--seed", "5", "--", "--cfg-scale")
    assert (r.prompt, r.seed) == ("--cfg-scale", 5)


@pytest.mark.parametrize("args, words", [
    (["--width", "768"], "--width needs --height too (textinv takes the size as --size WIDTHxHEIGHT, e.g. --size 768x512"),
    (["--height", "512"], "--height needs --width too"),
    (["--xformers=1"], None),  # train's flag, not sample's: unknown here
    (["--width", "768", "--height", "512", "--size", "512"], "--width/--height and --size both give the size"),
])
def test_width_or_height_alone_is_a_usage_error(cli, args, words):
    r = cli("sample", "a <x>", *args)
    assert r.exit_code == 2
    if words:
        assert words in r.stderr


def test_a_flag_alias_takes_no_value(cli, tmp_path):
    r = cli("train", tmp_path, "--token", "<x>", "--init", "toy", "--xformers=yes")
    assert r.exit_code == 2
    assert "--xformers is a flag" in r.stderr


@pytest.mark.parametrize("command, typed, meant", [
    ("train", "--learning-rat", "--lr"),
    ("train", "--learning_rat", "--lr"),
    ("train", "--placeholder-tokn", "--token"),
    ("train", "--initializer_tokn", "--init"),
    ("train", "--max-train-step", "--steps"),
    ("train", "--gradient-accumulation-step", "--grad-accum"),
    ("train", "--stepz", "--steps"),
    ("sample", "--cfg-scal", "--guidance"),
    ("sample", "--guidance-scal", "--guidance"),
    ("sample", "--negative-promt", "--negative"),
    ("sample", "--num-inference-step", "--steps"),
    ("sample", "--widht", "--size"),
])
def test_a_misspelt_name_gets_the_option_it_stands_for(cli, command, typed, meant):
    r = cli(command, "x", typed, "1")
    assert r.exit_code == 2
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"Error: No such option: {typed}")
    assert f"did you mean {meant}" in first or f"or {meant}" in first, first


def test_suggestions_never_name_an_alias():
    every = {a for table in aliases.ALIASES.values() for a in table} | set(aliases.SIZE_PARTS)
    group = typer.main.get_command(app)
    for command in ("train", "sample"):
        names = [n for p in group.commands[command].params for n in getattr(p, "opts", []) if p.param_type_name == "option"]
        for alias in every:
            for typo in (alias[:-1], alias + "s", alias.replace("-", "_")[:-1]):
                for said in aliases.suggest(command, typo, names):
                    assert said.split()[0] not in every - set(names), (command, typo, said)


def _help(cli, *args) -> str:
    r = cli(*args, "--help")
    assert r.exit_code == 0, r.output
    return r.stdout


def _commands(group, path=()):
    for name, cmd in getattr(group, "commands", {}).items():
        yield (*path, name), cmd
        yield from _commands(cmd, (*path, name))


COMMANDS = sorted(" ".join(path) for path, _ in _commands(typer.main.get_command(app)))


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_alias_and_describes_every_option_in_one_style(cli, command):
    text = _help(cli, *command.split())
    assert cli(*command.split(), "-h").stdout == text
    hidden = {a for table in aliases.ALIASES.values() for a in table} | set(aliases.SIZE_PARTS)
    assert not {a for a in hidden if re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", text)}
    assert "[[" not in text and "......" not in text and "<str>" not in text
    cmd = dict(_commands(typer.main.get_command(app)))[tuple(command.split())]
    ctx = cmd.make_context(command, ["--help"], resilient_parsing=True)
    for param in cmd.params:
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, description = record
        assert description.strip(), f"{command} {names} has no description"
        if param.param_type_name == "option":
            # -x, --long-name [VALUE] where VALUE is an UPPERCASE word or [choice|choice]
            assert re.fullmatch(r"(-\w, )?--[a-z0-9-]+( ([A-Z][A-Z_/]*|\[[a-z0-9.+|-]+\])(\.\.\.)?)?", names), names
        else:
            assert re.fullmatch(r"([A-Z_]+|\[[a-z0-9|+.-]+\])(\.\.\.)?", names), names


@pytest.mark.parametrize("command, option, source", [
    ("convert", "--to", ("textinv_cli.formats", "WRITERS")),
    ("sample", "--scheduler", ("textinv_cli.engine.checks", "SCHEDULERS")),
    ("sample", "--precision", ("textinv_cli.engine.checks", "PRECISIONS")),
    ("train", "--precision", ("textinv_cli.engine.checks", "PRECISIONS")),
    ("train", "--attention", ("textinv_cli.engine.checks", "ATTENTION")),
    ("train", "--captions", ("textinv_cli.engine.captions", "MODES")),
    ("train", "--property", ("textinv_cli.engine.captions", "PROPERTIES")),
    ("inspect", "--family", ("textinv_cli.families", "FAMILIES")),
    ("list", "--family", ("textinv_cli.families", "FAMILIES")),
    ("tiny-model", "--family", ("textinv_cli.families", "TRAINABLE_FAMILIES")),
    ("train", "--report-to", ("textinv_cli.engine.report_to", "REPORT_TO")),
])
def test_choice_options_list_their_choices(cli, command, option, source):
    import importlib

    choices = list(getattr(importlib.import_module(source[0]), source[1]))
    text = " ".join(_help(cli, command).split())
    assert f"{option} [{'|'.join(choices)}]" in text


def test_export_for_and_backend_list_choices(cli):
    assert re.search(r"--for \[a1111\|forge\|comfyui\|invokeai\|diffusers[|a-z]*\]", _help(cli, "export"))
    assert re.search(r"--backend \[[a-z|]*torch[a-z|]*\]", _help(cli, "train"))


def test_version_and_help_at_the_top(cli):
    from textinv_cli import __version__

    r = cli("--version")
    assert (r.exit_code, r.stdout) == (0, f"textinv {__version__}\n")
    assert cli("-h").stdout == cli("--help").stdout
    assert "completion" in cli("--help").stdout


def test_completion_scripts_and_answers(cli):
    for shell in ("bash", "zsh", "fish", "powershell"):
        r = cli("completion", shell)
        assert r.exit_code == 0 and "_TEXTINV_COMPLETE" in r.stdout
    r = cli("completion", "tcsh")
    assert r.exit_code == 2 and r.stderr.startswith("Error: SHELL must be one of bash, zsh, fish, powershell")
    env = {**os.environ, "_TEXTINV_COMPLETE": "complete_bash", "COMP_WORDS": "textinv train --l", "COMP_CWORD": "2"}
    out = subprocess.run([sys.executable, "-m", "textinv_cli"], env=env, capture_output=True, text=True, timeout=60)
    offered = out.stdout.split()
    assert "--lr" in offered and "--learning-rate" not in offered


# Bad input -> exit code and the first line; every line ours (no usage block, no blank line,
# no pydantic or click wording).
MATRIX = [
    (["train", "D", "--token", "<x>", "--init", "y", "--steps", "abc"], 2, "Error: --steps must be a whole number, not 'abc'."),
    (["train", "D", "--token", "<x>", "--init", "y", "--lr", "x"], 2, "Error: --lr must be a number, not 'x'."),
    (["train", "D", "--token", "<x>", "--init", "y", "--learning_rate=fast"], 2, "Error: --lr must be a number, not 'fast'."),
    (["train", "D", "--token", "<x>", "--init", "y", "--seed", "1.5"], 2, "Error: --seed must be a whole number, not '1.5'."),
    (["train", "D", "--token", "<x>", "--init", "y", "--steps"], 2, "Error: Option '--steps' requires an argument."),
    (["train", "D", "--token", "<x>", "--init", "y", "--steps", "0"], 2, "Error: --steps must be at least 1"),
    (["train"], 2, "Error: Missing argument 'DATA_DIR'."),
    (["sample", "a", "--guidance", "high"], 2, "Error: --guidance must be a number, not 'high'."),
    (["sample", "a", "--cfg-scale", "high"], 2, "Error: --guidance must be a number, not 'high'."),
    (["sample", "a", "-n", "two"], 2, "Error: --num-images must be a whole number, not 'two'."),
    (["sample", "a", "--precision", "fp8"], 2, "Error: --precision must be one of fp32, fp16, bf16"),
    (["inspect", "x", "--top", "0"], 2, "Error: --top must be at least 1, not '0'."),
    (["inspect", "x", "--top", "99"], 2, "Error: --top must be at most 50, not '99'."),
    (["list", "--family", "sd9"], 2, "Error: --family must be one of sd1, sd2, sdxl"),
    (["convert", "x", "--to", "kohya", "--max-size", "-1"], 2, "Error: --max-size must be"),
    (["export", "x", "--for", "nope", "d"], 2, "Error: --for must be one of a1111, forge"),
    (["frobnicate"], 2, "Error: No such command 'frobnicate'."),
    (["--bogus"], 2, "Error: No such option: --bogus."),
    (["rm", "nothing-here"], 1, "Error: No embedding named 'nothing-here'"),
    (["convert", "/nonexistent.pt", "--to", "kohya"], 1, "Error: "),
]


@pytest.mark.parametrize("args, code, first", MATRIX, ids=[" ".join(a[:4]) for a, _, _ in MATRIX])
def test_bad_input_matrix(cli, args, code, first, tmp_path):
    args = [str(tmp_path) if a == "D" else a for a in args]
    r = cli(*args)
    lines = r.stderr.splitlines()
    assert r.exit_code == code, r.stderr
    assert lines and lines[0].startswith(first), lines
    assert "" not in [line.strip() for line in lines], lines
    assert not re.search(r"Input should|Value error|Usage:|Invalid value for", r.stderr), r.stderr
    assert len(lines) <= 2


def test_the_console_script_prints_the_same_two_lines():
    """Through `python -m textinv_cli` (what the textinv script runs): stderr exactly as tested above."""
    out = subprocess.run([sys.executable, "-m", "textinv_cli", "sample", "a", "--num-inference-steps", "many"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TEXTINV_DEBUG": ""})
    assert out.returncode == 2
    assert out.stderr == "Error: --steps must be a whole number, not 'many'.\nTry: textinv sample --help\n"


def test_every_alias_stands_for_an_option_the_command_has():
    from textinv_cli.cli.usage import option_names

    group = typer.main.get_command(app)
    for command, table in aliases.ALIASES.items():
        names = option_names(group.commands[command])
        for alias, target in table.items():
            assert target[0] in names, (command, alias, target)
            assert alias not in names, f"{alias} is a real option of {command} now: drop the alias"
    assert "--size" in option_names(group.commands["sample"])


def test_a_misspelt_top_level_option_or_command_gets_a_suggestion(cli):
    r = cli("--verison")
    assert r.exit_code == 2 and "did you mean --version" in r.stderr
    r = cli("trian")
    assert r.exit_code == 2 and "'train'" in r.stderr

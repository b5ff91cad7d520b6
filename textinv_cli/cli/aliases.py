"""Option names people bring from other tools, accepted as hidden aliases of ours.

Users of diffusers' example scripts, kohya's sd-scripts and A1111's API type their own
spellings (`--placeholder_token`, `--learning-rate`, `--cfg-scale`, `--width 768`). The
table below is the one place that maps them; app.py rewrites the arguments of a command
before click parses them, so the aliases never show in --help or in shell completion, and
click's "did you mean" is computed here (suggest), naming only our own options: a
misspelt alias gets the option it stands for, never a neighbour it happens to resemble.

Every name of ours is also accepted with underscores (`--batch_size`), as argparse users type.

Sources (option names as the scripts' argparse declares them):
- diffusers examples/textual_inversion/textual_inversion.py (and _sdxl.py): --placeholder_token,
  --initializer_token, --learnable_property, --num_vectors, --train_batch_size,
  --gradient_accumulation_steps, --max_train_steps, --learning_rate, --lr_scheduler,
  --lr_warmup_steps, --adam_weight_decay, --adam_epsilon, --mixed_precision, --output_dir,
  --save_steps, --checkpointing_steps, --checkpoints_total_limit, --validation_prompt,
  --validation_steps, --enable_xformers_memory_efficient_attention,
  --pretrained_model_name_or_path, --train_data_dir; pipeline arguments num_inference_steps,
  guidance_scale, negative_prompt, num_images_per_prompt, width, height.
- kohya sd-scripts train_textual_inversion.py and its shared training arguments:
  --token_string, --init_word, --num_vectors_per_token, --use_object_template,
  --use_style_template, --max_train_steps, --learning_rate, --train_batch_size,
  --gradient_accumulation_steps, --lr_scheduler, --lr_warmup_steps, --mixed_precision,
  --save_every_n_steps, --xformers, --sdpa, --pretrained_model_name_or_path, --train_data_dir;
  gen_img(_diffusers).py: --W, --H, --scale, --sampler, --outdir, --images_per_prompt, --ckpt.
- A1111's web API (txt2img): negative_prompt, cfg_scale, width, height, sampler_name, steps, seed.
- A single-file model's prediction type: kohya's --v_parameterization (train_util's shared
  arguments and gen_img.py, a flag) and diffusers' --prediction_type (examples/text_to_image/
  train_text_to_image.py: "epsilon" or "v_prediction", both taken by our --prediction). kohya's
  --vae is already ours.

A value meant for another tool still meets our checks (`--lr-scheduler cosine_with_restarts`
or `--sampler euler_a` are refused with our choices listed): only the names are translated.
"""

from __future__ import annotations

import difflib

# alias -> what it stands for: our option, or our option and a value (a flag of theirs).
DIFFUSERS, KOHYA, A1111 = "diffusers", "kohya", "A1111"

TRAIN: dict[str, tuple[str, ...]] = {
    "--placeholder-token": ("--token",),            # diffusers
    "--token-string": ("--token",),                 # kohya
    "--initializer-token": ("--init",),             # diffusers
    "--init-word": ("--init",),                     # kohya
    "--num-vectors": ("--vectors",),                # diffusers
    "--num-vectors-per-token": ("--vectors",),      # kohya
    "--learnable-property": ("--property",),        # diffusers
    "--use-object-template": ("--property", "object"),  # kohya (a flag)
    "--use-style-template": ("--property", "style"),    # kohya (a flag)
    "--learning-rate": ("--lr",),                   # both
    "--max-train-steps": ("--steps",),              # both
    "--train-batch-size": ("--batch-size",),        # both
    "--gradient-accumulation-steps": ("--grad-accum",),  # both
    "--lr-scheduler": ("--lr-schedule",),           # both
    "--lr-warmup-steps": ("--warmup-steps",),       # both
    "--adam-weight-decay": ("--weight-decay",),     # diffusers
    "--adam-epsilon": ("--adam-eps",),              # diffusers
    "--mixed-precision": ("--precision",),          # both
    "--save-steps": ("--save-every",),              # diffusers
    "--save-every-n-steps": ("--save-every",),      # kohya
    "--checkpointing-steps": ("--checkpoint-every",),       # diffusers
    "--checkpoints-total-limit": ("--keep-checkpoints",),   # diffusers
    "--validation-prompt": ("--validate",),         # diffusers
    "--validation-steps": ("--validate-every",),    # diffusers
    "--enable-xformers-memory-efficient-attention": ("--attention", "xformers"),  # diffusers (a flag)
    "--xformers": ("--attention", "xformers"),      # kohya (a flag)
    "--sdpa": ("--attention", "sdpa"),              # kohya (a flag)
    "--pretrained-model-name-or-path": ("--model",),  # both
    "--output-dir": ("--run-dir",),                 # diffusers: where its checkpoints and embeddings go
    "--v-parameterization": ("--prediction", "v"),  # kohya (a flag)
    "--prediction-type": ("--prediction",),         # diffusers (train_text_to_image.py)
}

SAMPLE: dict[str, tuple[str, ...]] = {
    "--num-inference-steps": ("--steps",),          # diffusers
    "--guidance-scale": ("--guidance",),            # diffusers
    "--cfg-scale": ("--guidance",),                 # A1111
    "--scale": ("--guidance",),                     # kohya gen_img
    "--negative-prompt": ("--negative",),           # diffusers, A1111
    "--num-images-per-prompt": ("-n",),             # diffusers
    "--images-per-prompt": ("-n",),                 # kohya gen_img
    "--sampler": ("--scheduler",),                  # kohya gen_img
    "--sampler-name": ("--scheduler",),             # A1111
    "--outdir": ("--output",),                      # kohya gen_img
    "--output-dir": ("--output",),
    "--pretrained-model-name-or-path": ("--model",),  # diffusers
    "--ckpt": ("--model",),                         # kohya gen_img
    "--v-parameterization": ("--prediction", "v"),  # kohya gen_img (a flag)
    "--prediction-type": ("--prediction",),         # diffusers
}

# Names standing for one side of sample's --size WIDTHxHEIGHT (diffusers and A1111; kohya's --W/--H).
SIZE_PARTS = {"--width": 0, "--W": 0, "--height": 1, "--H": 1}

# A named folder as an option, where ours is the command's argument.
DATA_DIR = {"train": ("--train-data-dir",)}

ALIASES = {"train": TRAIN, "sample": SAMPLE}


class AliasUsageError(ValueError):
    """Aliases that cannot be translated (--width without --height): a usage error, exit 2."""


def rewrite(command: str, args: list[str], options: dict[str, bool]) -> list[str]:
    """`args` of `command` with every alias replaced by what it stands for.

    `options` maps each of the command's own option names to whether it takes a value, so a
    value is never mistaken for an option (`--negative --cfg-scale` keeps its text). Nothing
    after `--` is touched. --width/--height become --size WxH; one without the other is
    refused (AliasUsageError): textinv takes a size as a pair or one number for a square,
    and guessing the other side would silently change the picture.
    """
    table = ALIASES.get(command, {})
    sized = command == "sample"
    out: list[str] = []
    size: dict[int, str] = {}
    positional: list[str] = []
    given: set[str] = set()  # our own options on the line
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out.append(arg)
            out.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        canonical = _canonical(name, options)
        if canonical is not None:  # ours, perhaps with underscores
            given.add(canonical)
            out.append(f"{canonical}={value}" if eq else canonical)
            if options[canonical] and not eq and i < len(args):
                out.append(args[i])  # its value, whatever it looks like
                i += 1
            continue
        key = _dashed(name)
        if sized and (name in SIZE_PARTS or key in SIZE_PARTS):
            if not eq:
                if i >= len(args):
                    raise AliasUsageError(f"{name} needs a value, e.g. {name} 512.")
                value, i = args[i], i + 1
            size[SIZE_PARTS.get(name, SIZE_PARTS.get(key))] = value
            continue
        if key in DATA_DIR.get(command, ()):
            if not eq:
                if i >= len(args):
                    raise AliasUsageError(f"{name} needs a folder.")
                value, i = args[i], i + 1
            positional.append(value)
            continue
        target = table.get(key)
        if target is None:
            out.append(arg)  # click says it is unknown, with our suggestion (suggest below)
            continue
        if len(target) == 2 and eq:
            raise AliasUsageError(f"{name} is a flag (it means {' '.join(target)}); pass it without a value.")
        out.append(f"{target[0]}={value}" if eq else target[0])
        out.extend(target[1:])
        if len(target) == 1 and options.get(target[0]) and not eq and i < len(args):
            out.append(args[i])
            i += 1
    if size:
        if len(size) == 1:
            given, missing = ("--width", "--height") if 0 in size else ("--height", "--width")
            raise AliasUsageError(f"{given} needs {missing} too (textinv takes the size as --size WIDTHxHEIGHT, "
                                  f"e.g. --size 768x512, or --size 768 for a square).")
        if "--size" in given:
            raise AliasUsageError("--width/--height and --size both give the size; pass one of them.")
        _insert(out, ["--size", f"{size[0]}x{size[1]}"])
    if positional:
        if "--" not in out:
            out.append("--")
        out.extend(positional)
    return out


def _insert(out: list[str], more: list[str]) -> None:
    """Options go before a `--` (after it they would be taken as arguments)."""
    at = out.index("--") if "--" in out else len(out)
    out[at:at] = more


def _dashed(name: str) -> str:
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def _canonical(name: str, options: dict[str, bool]) -> str | None:
    if name in options:
        return name
    dashed = _dashed(name)
    return dashed if dashed in options and dashed != name else None


def suggest(command: str, typed: str, options: list[str]) -> list[str]:
    """What a mistyped option most likely meant, always one of ours (`options`, the command's
    visible long names): an alias that is close stands for the option it maps to."""
    table = dict(ALIASES.get(command, {}))
    if command == "sample":
        table.update({k: ("--size",) for k in SIZE_PARTS if k.startswith("--") and len(k) > 3})
    table.update({k: ("DATA_DIR",) for k in DATA_DIR.get(command, ())})
    name = _dashed(typed.partition("=")[0])
    pool = {o: (o,) for o in options if o.startswith("--")}
    pool.update(table)
    found: list[str] = []
    for match in difflib.get_close_matches(name, list(pool), n=3, cutoff=0.7):
        target = pool[match]
        shown = "the DATA_DIR argument" if target == ("DATA_DIR",) else " ".join(target)
        if shown not in found:
            found.append(shown)
    return found


"""textinv sample PROMPT: generate images, loading every registered token in the prompt.

Everything that can be refused without a model is refused first (options, unknown
`<tokens>`, an embedding of another model family), so a typo costs no model load.
The backend yields events; this module renders them (progress bar, or --json lines).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ...engine.checks import PRECISIONS
from ...engine.samplers import NAMES as _NAMES
from ..options import MODEL_HELP, PREDICTION_HELP, VAE_HELP, prediction_option

_A1111_NAMES = ", ".join(f'"{n}"' if " " in n else n for n in _NAMES)

# The option rules are engine/checks.py's (check_sample_request), checked before any work.


def sample(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Argument(None, help='e.g. "A <cat-toy> backpack"; registered tokens in it are loaded (a token '
                                           "shared by several versions: the active one). A registry name typed as a word "
                                           "(cat-toy-v2) loads that entry, as A1111 does; one that is an ordinary word "
                                           "(orange) stays a word. Optional with --params-from."),
    n: int = typer.Option(1, "-n", "--num-images", help="How many images (image i uses seed + i)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Images rendered at once (default: up to 8 at 512x512, fewer for larger "
                                   "sizes); image i is the same picture (up to float rounding) in any batch."),
    steps: int = typer.Option(30, "--steps", help="Denoising steps per image."),
    scheduler: str = typer.Option("ddim", "--scheduler", help=f"Or A1111's sampler name, any case: {_A1111_NAMES} "
                                                              "(jax: DDIM, Euler, Euler a, DPM++ 2M, DPM++ 2M Karras)."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale (CFG)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image."),
    size: Optional[str] = typer.Option(None, "--size", help="512 (square) or WIDTHxHEIGHT such as 768x512 (default: the model's)."),
    allow_large: bool = typer.Option(False, "--allow-large", help="Accept a size beyond the model's limit (4x its "
                                     "native size, or more than the memory available; also TEXTINV_ALLOW_LARGE=1)."),
    negative: str = typer.Option("", "--negative", help="Negative prompt (registered tokens in it are loaded too)."),
    clip_skip: int = typer.Option(1, "--clip-skip", metavar="N", help="A1111's Clip skip: condition on the text "
                                  "encoder's N-th layer from the end (1: the last; 2 is common with anime models)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    prediction: Optional[str] = typer.Option(None, "--prediction", metavar="[epsilon|v]", callback=prediction_option,
                                             help=PREDICTION_HELP),
    vae: Optional[Path] = typer.Option(None, "--vae", metavar="FILE", help=VAE_HELP),
    out: Path = typer.Option(Path("samples"), "-o", "--output", help="Folder for the PNGs (numbered after existing files)."),
    precision: str = typer.Option("fp32", "--precision", help=f"{', '.join(PRECISIONS)} (fp16: CUDA only)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch or jax (default: the first usable one)."),
    use: Optional[List[str]] = typer.Option(None, "--use", metavar="NAME",
                                            help="Registry entry to use for its token in this run, instead of the "
                                                 "active version (repeatable; `textinv use NAME` switches for good)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON event per line instead of a progress bar."),
    grid: bool = typer.Option(False, "--grid", help="Also write a contact sheet of the images (grid-NNNN.png, "
                                                    "with the first image's parameters, as A1111's grids)."),
    params_from: Optional[Path] = typer.Option(
        None, "--params-from", metavar="PNG", help="Reproduce a picture: take the prompt, negative prompt, steps, "
                                                   "sampler, CFG scale, seed and size from the parameters A1111 (or "
                                                   "textinv sample) wrote into this PNG; options given here win."),
) -> None:
    """Sample images with registered embeddings (PNG info as A1111 writes it)."""
    from ...engine.checks import check_sample_request, check_size, parse_size
    from ...errors import TextinvError
    from ...engine.prompt_tokens import check_families, prompt_embeddings
    from ...registry.store import Registry
    from ...engine.spec import EmbeddingRef, SampleRequest
    from ...models.resolve import configured_model

    model = configured_model(model)  # --model, else TEXTINV_MODEL / textinv config set model
    width = height = None
    more = []
    if params_from is not None:
        given = {name for name in ("steps", "scheduler", "guidance", "seed", "size", "negative", "clip_skip")
                 if _given(ctx, name)}
        taken = _params_from(params_from, prompt is not None, given)
        prompt = taken.get("prompt", prompt)
        negative = taken.get("negative", negative)
        steps, scheduler = taken.get("steps", steps), taken.get("scheduler", scheduler)
        guidance, seed = taken.get("guidance", guidance), taken.get("seed", seed)
        clip_skip = taken.get("clip_skip", clip_skip)
        if "width" in taken:
            width, height = taken["width"], taken["height"]
        from ..console import err_console

        used = [f"{label} {taken[k]}" for label, k in (("Steps", "steps"), ("Sampler", "scheduler"),
                                                       ("CFG scale", "guidance"), ("Seed", "seed"),
                                                       ("Clip skip", "clip_skip")) if k in taken]
        used += [f"Size {width}x{height}"] if "width" in taken else []
        err_console.print(f"Note: from {params_from}: {', '.join(['prompt'] * ('prompt' in taken) + used) or 'nothing'} "
                          "(options given here win).", markup=False, style="dim")
        model = _model_from_params(taken, model if _given(ctx, "model") else None, vae, err_console) or model
    if prompt is None:
        from ...errors import OptionError

        raise OptionError("Missing argument 'PROMPT'.", 'Pass one, e.g. textinv sample "A <cat-toy> backpack", '
                                                        "or --params-from IMAGE.png.")
    if size is not None:
        try:
            width, height = parse_size(size)
        except ValueError as e:
            more.append(str(e))
    from ...engine.samplers import key_of

    request = SampleRequest(
        prompt=prompt, model=model or "tiny", out_dir=str(out.expanduser().absolute()), negative=negative, n=n,
        steps=steps, scheduler=key_of(scheduler) or scheduler, guidance=guidance, seed=seed, width=width, height=height,
        precision=precision, batch_size=batch_size, clip_skip=clip_skip)
    check_sample_request(request, more=more)  # every out-of-range option at once, before any work
    if not prompt.strip():
        raise TextinvError("The prompt is empty.", 'Pass one, e.g. textinv sample "A <cat-toy> backpack".')
    registry = Registry()
    found = prompt_embeddings(prompt, negative, registry.entries(), use=[registry.resolve(n) for n in use or ()])
    entries = [u.entry for i, u in enumerate(found.used) if u.entry not in [v.entry for v in found.used[:i]]]

    from ...models.resolve import model_family, model_notes, resolve_model
    from ...engine.plugins import require_backend

    from ..base_model import choose_with_vae, with_late_vae
    from ..console import err_console as _err
    from ...models.resolve import folder_on_disk, loading_line

    # A checkpoint file: its family checked against the prompt's embeddings, then converted once;
    # `target` is the folder made (else `model` as given), which the checks below read.
    chosen_model, target = choose_with_vae(
        model, vae, prediction=prediction, command="sample", args=ctx.meta.get("textinv.args"),
        before_convert=lambda family, label: check_families(entries, label, family))
    on_disk = folder_on_disk(target)  # a model already here: a family mismatch is said before any backend loads
    if on_disk is not None:
        check_families(entries, chosen_model.label or on_disk.name, model_family(str(on_disk)))
        check_size(width, height, str(on_disk), flag="--size", allow=allow_large, side_only=True)
    _err.print(loading_line(model, backend), markup=False, style="dim")  # the wait until the first image, named
    chosen = require_backend(backend)
    check_sample_request(request, chosen)  # and what this backend cannot do
    resolved = with_late_vae(chosen_model, vae, resolve_model(target, backend=getattr(chosen, "name", None)))
    check_size(width, height, resolved, flag="--size", allow=allow_large, backend=chosen)  # before the model loads
    from ...engine.infotext import model_label

    model_name = chosen_model.label or model_label(resolved)
    check_families(entries, model_name, model_family(resolved))
    from ...engine.infotext import a1111_model_fields

    fields = a1111_model_fields(str(chosen_model.file) if chosen_model.file else None, chosen_model.sha256,
                                str(chosen_model.vae_file) if chosen_model.vae_file else None, chosen_model.vae_sha256)
    for key, value in fields.items():  # the PNG parameters' Model hash, Model, VAE hash, VAE (A1111's)
        setattr(request, key, value)
    refs = []
    for used in found.used:  # the token the prompt holds: the entry's, or its name typed as a word
        emb = registry.load(used.entry)
        refs.append(EmbeddingRef(token=used.token, vectors=emb.vectors, short_hash=_short_hash(used.entry),
                                 name=used.entry.name))
    request.model, request.embeddings = resolved, refs
    from ..console import err_console

    for note in found.notes:  # which entries a name in the prompt loaded, or did not
        err_console.print(f"Note: {note}", markup=False, style="dim")

    for note in model_notes(model):  # on stderr: --json's stdout stays events only
        err_console.print(f"Note: {note}", markup=False, style="dim")
    events = chosen.sample(request)
    if grid:  # the sheet is written once the last image is; `finished` names it
        from ...engine.infotext import with_grid

        events = with_grid(events, Path(request.out_dir))
    try:
        if json_out:
            _render_json(events)
        else:
            _render_rich(events, model_name)
    finally:
        # On Ctrl-C or an error, close the backend's generator now (not at garbage
        # collection), so it stops its work after the current denoising step.
        close = getattr(events, "close", None)
        if close is not None:
            close()


def _model_from_params(taken: dict, model: str | None, vae, say) -> str | None:
    """The model a parameters block names, where --model is not given: a checkpoint of that
    name in the model folders (A1111's Model), else `model` unchanged with a note naming it.
    A different hash, or a VAE the picture used (A1111's VAE), is said, not guessed."""
    from ...errors import TextinvError
    from ...models.model_files import find_model_file
    from ...untrusted import shown

    title, short = taken.get("model_title"), taken.get("model_hash")
    notes = []
    if model is None and title:
        try:
            found = find_model_file(title)
        except TextinvError:
            found = None
        if found is not None:
            model = str(found)
            notes.append(f"the picture's Model {shown(title, 120)}"
                         + (f" (Model hash {shown(short, 12)})" if short else "") + f" is {shown(str(found), 200)}")
        else:
            notes.append(f"the picture was made with the Model {shown(title, 120)}"
                         + (f" ({shown(short, 12)})" if short else "") + "; pass --model with it for the same picture")
    if vae is None and taken.get("vae_name"):
        notes.append(f"the picture was made with the VAE {shown(taken['vae_name'], 120)}; pass --vae FILE for the "
                     "same pixels")
    for note in notes:
        say.print(f"Note: {note}.", markup=False, style="dim")
    return model


def _given(ctx, name: str) -> bool:
    """Whether option `name` was given on the command line (or by an alias), not defaulted."""
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is not None and source.name != "DEFAULT"


def _params_from(path: Path, has_prompt: bool, given: set[str]) -> dict:
    """The sample options of the A1111 parameters block in the PNG at `path`, less those the
    command line gives (`given`, and the prompt when `has_prompt`). Unreadable values and a
    sampler textinv does not run are usage errors naming the file; all text is escaped."""
    from ...engine.infotext import model_fields, read_png_parameters, sample_options
    from ...engine.samplers import NAMES, find
    from ...errors import OptionError
    from ...untrusted import quoted

    text = read_png_parameters(path.expanduser())
    found, bad = sample_options(text)
    found.update(model_fields(text))  # looked up by _model_from_params
    for name in given:
        found.pop(name, None)
        bad.pop(name, None)
    problems = list(bad.values())
    if "size" in given:
        found.pop("width", None)
        found.pop("height", None)
    if has_prompt:
        found.pop("prompt", None)
    if "scheduler" in found and find(found["scheduler"]) is None:
        problems.append(f"its Sampler {quoted(found['scheduler'], 60)} is not one textinv runs "
                        f"({', '.join(NAMES)})")
    if problems:
        raise OptionError(f"--params-from {quoted(str(path), 120)}: " + "; ".join(problems) + ".",
                          "Give that option on the command line (e.g. --scheduler \"DPM++ 2M\"), which takes "
                          "precedence over the image's.")
    return found


def _short_hash(entry) -> str:
    """A1111's short hash: the first 12 hex of the embedding *file's* sha256, so it matches
    what A1111 writes for the same file; the registry blob's own sha256 when there is no file."""
    full = entry.meta.get("file_sha256") or entry.origin.get("file_sha256") or entry.sha256
    return str(full)[:12]


def _render_json(events) -> None:
    from ..console import print_json_line

    for event in events:
        print_json_line(event.to_json())


def _render_rich(events, model_name: str) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    from ..console import console

    written: list[str] = []
    progress = None
    task = None
    out_dir = None
    try:
        stream = iter(events)
        # the first event comes once the model is loaded; Text: a str status is parsed as markup
        with console.status(Text(f"Loading {model_name}…")):
            first = next(stream, None)
        for event in _chain(first, stream):
            data = event.data
            if event.kind == "started":
                out_dir = data.get("out_dir")
                used = ", ".join(e["token"] for e in data.get("embeddings", [])) or "no embeddings"
                at_once = f", {data['batch_size']} at a time" if data.get("batch_size", 1) > 1 else ""
                console.print(f"Sampling {data['images']} image(s){at_once} with {model_name} on {data['device']} "
                              f"({data['sampler']}, {data['steps']} steps; {used})", markup=False)
                progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[rate]}", markup=False), TimeElapsedColumn(),
                                    TimeRemainingColumn(),
                                    console=console, transient=False)
                progress.start()
                task = progress.add_task("image 1", total=data.get("total"), rate="")
            elif event.kind == "progress" and progress is not None:
                speed = progress.tasks[0].speed
                progress.update(task, completed=data["done"], description=_images_label(data),
                                rate=f"{speed:.2f} it/s" if speed else "")
            elif event.kind == "sample":
                written.append(data["path"])
                (progress.console if progress else console).print(f"Wrote {data['path']}", markup=False)
            elif event.kind == "warning":
                (progress.console if progress else console).print(f"Warning: {data.get('message', data)}", markup=False)
            elif event.kind == "finished" and data.get("grid"):
                (progress.console if progress else console).print(f"Wrote grid {data['grid']}", markup=False)
    finally:
        if progress is not None:
            progress.stop()
    if written:
        console.print(f"{len(written)} image(s) in {out_dir or Path(written[0]).parent}", markup=False)


def _images_label(data: dict) -> str:
    """"image 3/8" for one image at a time, "images 1-8/8" for a batch (its rate counts image-steps)."""
    first, count = data["image"] + 1, data.get("batch", 1)
    if count <= 1:
        return f"image {first}/{data['images']}"
    return f"images {first}-{first + count - 1}/{data['images']}"


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest

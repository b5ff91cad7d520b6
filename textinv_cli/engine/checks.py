"""Every option rule, in one place: checked on the typed TrainSpec / SampleRequest before
anything is loaded or written, by the CLI (train, sample) and again by the run engine and
the samplers for callers that skip the CLI. The limits and choice vocabularies are defined
here once; the CLI's --help text is written from the same constants.

A rule that depends on the backend (xformers attention, several processes, a sampler) is
read from the Backend's declared capabilities (contract.Backend: name, attention,
schedulers, multi_process, mesh), so a backend never re-checks options itself. Messages name the flag and say what is accepted.
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Any

from ..errors import OptionError, TextinvError
from ..untrusted import quoted
from . import samplers as _samplers

if TYPE_CHECKING:
    from .spec import SampleRequest, TrainSpec

VECTORS_MAX = 64     # placeholder tokens per concept: leaves the caption's words room in CLIP's 75
RESOLUTION_STEP = 8  # every Stable Diffusion VAE downsamples by 8
PRECISIONS = ("fp32", "fp16", "bf16")
CLIP_SKIP_MAX = 12   # CLIP ViT-L has 12 layers (OpenCLIP-H/G more; A1111's slider stops at 12)
ATTENTION = ("sdpa", "xformers")
# --scheduler's vocabulary (engine/samplers.py, the one table): these keys, which --help
# lists, and A1111's sampler names ("Euler a", "DPM++ 2M Karras"), which messages use; any case.
SCHEDULERS = _samplers.KEYS


def is_int(v: Any) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to us)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_mesh(text: Any) -> tuple[int, int]:
    """--mesh "DATAxMODEL" (e.g. "4x2": 4 groups of 2 devices) -> (4, 2). Whether it fits the
    devices is the backend's to say (it knows them); the form is checked here."""
    m = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", text) if isinstance(text, str) else None
    if m is None or int(m[1]) < 1 or int(m[2]) < 1:
        raise OptionError(f"--mesh must be DATAxMODEL, two positive whole numbers, not {quoted(str(text))}.",
                          "For example, on 8 devices: --mesh 4x2 (the frozen weights split over 2 devices), "
                          "--mesh 8x1 (data parallel).")
    return int(m[1]), int(m[2])


def check_train_spec(spec: "TrainSpec", backend: Any = None) -> None:
    """Every training option in range (and supported by `backend`); the first problem raises."""
    from .schedules import validate as validate_schedule

    def need(ok: bool, name: str, what: str, hint: str | None = None):
        if not ok:
            raise OptionError(f"{flag(name)} {what}, not {getattr(spec, name)!r}.", hint)

    if not isinstance(spec.token, str) or not spec.token.strip() or any(c.isspace() for c in spec.token):
        raise OptionError(f"--token must be one word without spaces, not {spec.token!r}.",
                           'For example --token "<cat-toy>".')
    if not spec.init or not all(isinstance(w, str) and w.strip() for w in spec.init):
        raise OptionError("--init needs at least one non-empty word.", "For example --init toy.")
    need(is_int(spec.vectors) and 1 <= spec.vectors <= VECTORS_MAX, "vectors", f"must be between 1 and {VECTORS_MAX}")
    need(spec.resolution is None or (is_int(spec.resolution) and spec.resolution > 0
                                     and spec.resolution % RESOLUTION_STEP == 0), "resolution",
         f"must be a positive multiple of {RESOLUTION_STEP}",
         "Use the model's size (512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL) or leave it out.")
    need(is_num(spec.flip_p) and 0 <= spec.flip_p <= 1, "flip_p", "must be a probability between 0 and 1")
    for name in ("steps", "batch_size", "grad_accum", "validate_steps", "num_processes"):
        need(is_int(getattr(spec, name)) and getattr(spec, name) >= 1, name, "must be at least 1")
    for name in ("warmup_steps", "save_every", "checkpoint_every", "keep_checkpoints", "validate_every", "seed"):
        need(is_int(getattr(spec, name)) and getattr(spec, name) >= 0, name, "must be 0 or more")
    need(is_num(spec.lr) and spec.lr > 0, "lr", "must be a positive learning rate", "Typical: 5e-3 (A1111) or 5e-4.")
    validate_schedule(spec.lr_schedule)
    for name in ("adam_beta1", "adam_beta2"):
        need(is_num(getattr(spec, name)) and 0 <= getattr(spec, name) < 1, name, "must be in [0, 1)")
    need(is_num(spec.adam_eps) and spec.adam_eps > 0, "adam_eps", "must be positive")
    need(is_num(spec.weight_decay) and spec.weight_decay >= 0, "weight_decay", "must be 0 or more")
    need(spec.max_grad_norm is None or (is_num(spec.max_grad_norm) and spec.max_grad_norm > 0), "max_grad_norm",
         "must be positive (or left out)")
    need(spec.precision in PRECISIONS, "precision", f"must be {_one_of(PRECISIONS)}")
    need(spec.attention in ATTENTION, "attention", f"must be {_one_of(ATTENTION)}")
    need(is_int(spec.clip_skip) and 1 <= spec.clip_skip <= CLIP_SKIP_MAX, "clip_skip",
         f"must be between 1 and {CLIP_SKIP_MAX} (1: the text encoder's last layer, as A1111 counts)")
    need(getattr(spec, "prediction", None) in (None, "epsilon", "v"), "prediction",
         "must be epsilon or v (for a single-file checkpoint that does not say)")
    if not all(isinstance(p, str) and p.strip() for p in spec.validate):
        raise OptionError("--validate prompts must be non-empty text.")
    if getattr(spec, "mesh", None) is not None:
        parse_mesh(spec.mesh)
    if backend is not None:
        check_train_backend(spec, backend)


def train_warnings(spec: "TrainSpec", *, sidecars: int | None = None, on_gpu: bool | None = None) -> list[str]:
    """Options that are valid but do nothing, or not what was meant: said before the run starts.

    `sidecars`: how many images have a .txt caption (for --captions both); `on_gpu`: whether
    the backend trains on an accelerator (None: unknown, nothing said about precision)."""
    notes = []
    if spec.validate_every and not spec.validate:
        notes.append(f"--validate-every {spec.validate_every} makes no images without --validate PROMPT.")
    for prompt in spec.validate:
        if spec.token not in prompt:
            notes.append(f"The validation prompt {prompt!r} does not contain {spec.token}: "
                         "its images will not show what is being learned.")
    if spec.warmup_steps > spec.steps:
        notes.append(f"--warmup-steps {spec.warmup_steps} is more than --steps {spec.steps}: "
                     f"the learning rate never reaches --lr.")
    if spec.captions == "both" and sidecars == 0:
        notes.append("--captions both, but no image has a .txt caption beside it: only the templates are used.")
    if on_gpu is False and spec.precision != "fp32":
        notes.append(f"--precision {spec.precision} on a CPU only saves memory: it is slower than fp32 there.")
    return notes


def check_train_backend(spec: "TrainSpec", backend: Any) -> None:
    """What `backend` (a contract.Backend: name, attention, multi_process) declares it
    cannot do, refused by name."""
    name = getattr(backend, "name", "chosen")
    attention = getattr(backend, "attention", ATTENTION)  # a backend that is no Backend subclass: no limits
    if spec.attention not in attention:
        raise TextinvError(f"--attention {spec.attention} is a PyTorch library; the {name} backend runs "
                           f"{_one_of(attention)} attention only.",
                           f"Leave --attention at sdpa with --backend {name}, or use --backend torch.")
    _check_clip_skip(spec.clip_skip, backend, name)
    if getattr(spec, "mesh", None) is not None and not getattr(backend, "mesh", True):
        raise TextinvError(f"The {name} backend does not shard a model over devices; --mesh {spec.mesh} is for "
                           "--backend jax.", "Leave --mesh out, or pass --backend jax.")
    if spec.num_processes != 1 and not getattr(backend, "multi_process", True):
        raise TextinvError(f"The {name} backend trains on every device from one process per host; "
                           f"--num-processes {spec.num_processes} is for --backend torch.",
                           "Leave --num-processes out: all local devices are used (several hosts: "
                           "jax.distributed, JAX_COORDINATOR_ADDRESS).")


def _check_clip_skip(clip_skip, backend, name: str) -> None:
    """--clip-skip above 1 needs a backend that declares it (contract.Backend.clip_skip)."""
    if is_int(clip_skip) and clip_skip > 1 and not getattr(backend, "clip_skip", True):
        raise TextinvError(f"The {name} backend uses the text encoder's last layer only; --clip-skip {clip_skip} "
                           "is for --backend torch.", "Leave --clip-skip out, or pass --backend torch.")


def check_sample_request(r: "SampleRequest", backend: Any = None, *, more: list[str] | None = None) -> None:
    """Every out-of-range sampling option at once (plus `more` problems found while parsing);
    then a scheduler `backend` (a contract.Backend: name, schedulers) does not run."""
    problems = []
    if not (is_int(r.n) and r.n >= 1):
        problems.append(f"-n must be at least 1, not {r.n!r}")
    if not (is_int(r.steps) and r.steps >= 1):
        problems.append(f"--steps must be at least 1, not {r.steps!r}")
    if r.batch_size is not None and not (is_int(r.batch_size) and r.batch_size >= 1):
        problems.append(f"--batch-size must be at least 1, not {r.batch_size!r}")
    if not (is_num(r.guidance) and r.guidance >= 0):
        problems.append(f"--guidance must be 0 or more, not {r.guidance!r}")
    sampler = _samplers.find(r.scheduler)
    if sampler is None:
        problems.append(f"--scheduler must be one of {', '.join(_samplers.NAMES)} (A1111's names, any case), "
                        f"not {quoted(r.scheduler)}")
    if r.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, not {r.precision!r}")
    if not all(v is None or (is_int(v) and v >= RESOLUTION_STEP and v % RESOLUTION_STEP == 0)
               for v in (r.width, r.height)):
        problems.append(f"--size must be a positive multiple of {RESOLUTION_STEP}, not {r.width!r}x{r.height!r}")
    if not (is_int(r.clip_skip) and 1 <= r.clip_skip <= CLIP_SKIP_MAX):
        problems.append(f"--clip-skip must be between 1 and {CLIP_SKIP_MAX}, not {r.clip_skip!r}")
    problems += more or []
    if problems:
        raise OptionError("; ".join(problems) + ".", "See textinv sample --help for the accepted values.")
    if backend is not None:
        _check_clip_skip(r.clip_skip, backend, getattr(backend, "name", "chosen"))
    declared = getattr(backend, "schedulers", _samplers.NAMES)
    runs = [_samplers.a1111_name(s) for s in declared]
    if sampler.name not in runs:
        torch = f", or --backend torch, which runs {sampler.name!r}" if getattr(backend, "name", "") != "torch" else ""
        raise TextinvError(f"The {getattr(backend, 'name', 'chosen')} backend samples with {_one_of(tuple(runs))}, "
                           f"not {sampler.name!r}.",
                           f"Pass --scheduler {_shell(runs[0])}{torch}." if runs else
                           "Pick another backend with --backend.")
    if sampler.needs and not _importable(sampler.needs):
        raise TextinvError(f"The {sampler.name} sampler needs the {sampler.needs} package, which is not installed.",
                           f"Install it (pip install {sampler.needs}), or pass --scheduler {_shell('DPM++ 2M Karras')}.")


def _shell(word: str) -> str:
    """A sampler name as typed in a shell: quoted when it holds a space."""
    return f'"{word}"' if " " in word else word


def _importable(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_token(token: str, tokenizer, label: str = "tokenizer") -> None:
    """Refuse tokens that would collide with `tokenizer`'s vocabulary or cannot be one token
    (every backend, before the tokenizer is changed)."""
    if not isinstance(token, str) or not token.strip():
        raise TextinvError("The placeholder token is empty.", 'Pass --token, e.g. --token "<cat-toy>".')
    if any(c.isspace() for c in token):
        raise TextinvError(f"The token {token!r} contains spaces; a placeholder is one word.",
                           'Use dashes instead, e.g. --token "<cat-toy>".')
    vocab = tokenizer.get_vocab()
    pieces = tokenizer.tokenize(token)
    # "toy" is already "toy</w>": training it would hijack a real word in every prompt.
    if token in vocab or token.lower() in vocab or (len(pieces) == 1 and pieces[0] in vocab):
        raise TextinvError(f"The token {token!r} is already in the {label}'s vocabulary.",
                           f'Pick a new word, e.g. --token "<{token.strip("<>")}-concept>" (angle brackets help).')


def check_words_early(token: str, words: list[str], vectors: int, model: str | None) -> None:
    """check_token and the --init words (captions.init_token_ids) on the model's tokenizer
    files alone (models/vocab.py), before a backend imports anything: the same rules, in
    milliseconds. Skipped where the files are not on disk yet (a tiny model's first use, a Hub
    id not downloaded), for text the light reader does not answer (non-ASCII) and for a
    registered embedding as --init; the backend checks all of it again on the real tokenizer."""
    from ..models.resolve import tokenizer_folders
    from ..models.vocab import Vocabulary, vocabulary
    from .captions import init_token_ids
    from .init_from import parse

    if not all(Vocabulary.answers(t) for t in (token, *words)):
        return
    try:
        folders = tokenizer_folders(model)
        readers = [(slot, vocabulary(str(folder))) for slot, folder in folders]
    except (OSError, ValueError, TextinvError):  # unreadable files: the backend says it, in its words
        return
    reference = parse(words) is not None
    for slot, vocab in readers:
        check_token(token, vocab, f"{slot} tokenizer")
    for slot, vocab in readers:
        if not reference:
            init_token_ids(vocab, words, vectors, f"{slot} tokenizer")


def check_images_open(images) -> None:
    """Every training image opens as an image (PIL reads its header and checks its structure
    without decoding it): a broken file is named before the model loads, not after. The full
    decode (engine/images.open_rgb, with the same words) still happens when the data loads."""
    from PIL import Image, UnidentifiedImageError

    for path in dict.fromkeys(images):  # kohya's N_name folders list an image N times
        try:
            with Image.open(path) as f:
                f.verify()
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError) as e:
            raise TextinvError(f"Cannot read the image {path}: {e}",
                               "Remove or re-save it (PNG/JPEG), or move it out of the data folder.") from None


def parse_size(size: str) -> tuple[int, int]:
    """"512" -> (512, 512); "768x512" -> width 768, height 512 (A1111's WxH order)."""
    parts = size.lower().replace("×", "x").split("x")
    try:
        dims = [int(p.strip()) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < RESOLUTION_STEP or any(d % RESOLUTION_STEP for d in dims):
        raise ValueError(f"--size must be a positive multiple of {RESOLUTION_STEP} such as 512 or 768x512, "
                         f"not {size!r}")
    return dims[0], dims[1]


# Image sizes (train --resolution, sample --size) are refused before anything loads when they
# are sure to fail or to be useless, unless --allow-large (or TEXTINV_ALLOW_LARGE=1) says try:
# - memory: one image's full-resolution VAE activations (width x height x the VAE's first-block
#   channels x 4 bytes, three tensors alive: a block's input, output and residual) must fit in
#   the memory available: the accelerator's, where the backend's probe() reports it (CUDA's
#   total memory, JAX's bytes_limit: known without allocating), else the RAM available now
#   (/proc/meminfo MemAvailable). It is a lower bound: the UNet, the weights and a batch come on
#   top, so only a size that cannot fit is refused.
# - side: at most SIZE_FACTOR x the model's native size (512 -> 2048 for SD 1.5, 4096 for SDXL):
#   far beyond it Stable Diffusion repeats its subject and the cost grows with the square. Never
#   below SIZE_FLOOR, so the tiny models (native 64) take the sizes real models use.
SIZE_FACTOR = 4
SIZE_FLOOR = 2048
ALLOW_LARGE_ENV = "TEXTINV_ALLOW_LARGE"
_LIVE_TENSORS = 3
_BYTES = 4  # the VAE runs in fp32 (diffusers upcasts it; force_upcast)


GPU_MEMORY = "accelerator_memory_bytes"  # BackendInfo.details key: the smallest accelerator's memory


def available_memory(backend: Any = None) -> int | None:
    """Bytes a new allocation can have now: the accelerator's memory when `backend` (a
    contract.Backend) runs on one and its probe() says how much (details[GPU_MEMORY], read
    without allocating), else the RAM available (Linux MemAvailable); None when unknown."""
    if backend is not None:
        try:
            gpu = backend.probe().details.get(GPU_MEMORY)
        except Exception:  # noqa: BLE001 - only sizes a refusal; the RAM rule still holds
            gpu = None
        if gpu is not None and str(gpu).isdigit():
            return int(gpu)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def allow_large(option: bool) -> bool:
    return option or os.environ.get(ALLOW_LARGE_ENV, "").strip() not in ("", "0")


def check_size(width: int | None, height: int | None, model: str, *, flag: str, allow: bool = False,
               memory: int | None = None, backend: Any = None, side_only: bool = False) -> None:
    """Refuse a size given with `flag` (--resolution, --size) that cannot fit in memory (`memory`
    bytes, else available_memory(backend)) or is far beyond `model`'s native size (the rule
    above). None: the model's own size, always fine. `side_only`: before a backend is chosen
    (whether it trains on an accelerator, and with how much memory, is not known yet)."""
    if allow_large(allow) or width is None or height is None:
        return
    from ..models.resolve import model_geometry

    geometry = model_geometry(model)
    native, channels = geometry if geometry is not None else (None, 128)  # 128: every SD 1.x/2.x/XL VAE
    given = f"{flag} {width}" if width == height and flag == "--resolution" else f"{flag} {width}x{height}"
    way_out = (f"Use {flag} {native} (the model's size), or add --allow-large (or set {ALLOW_LARGE_ENV}=1) "
               "to try anyway." if native else
               f"Use a smaller {flag}, or add --allow-large (or set {ALLOW_LARGE_ENV}=1) to try anyway.")
    need = width * height * channels * _BYTES * _LIVE_TENSORS
    memory = available_memory(backend) if memory is None and not side_only else memory
    if memory is not None and need > memory and not side_only:
        raise OptionError(f"{given} needs at least {_gib(need)} of memory for one image (its full-size VAE "
                          f"layers alone); {_gib(memory)} is available.", way_out)
    limit = max(SIZE_FLOOR, SIZE_FACTOR * native) if native else None
    if limit is not None and max(width, height) > limit:
        raise OptionError(f"{given} is larger than this model takes: at most {limit} px a side "
                          f"({SIZE_FACTOR}x its native {native} px, and never less than {SIZE_FLOOR}).", way_out)


def _gib(n: int) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.1f} GiB"


def _one_of(choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]

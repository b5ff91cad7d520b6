"""Training that continues a registered embedding: `train --from NAME`, or `--init "<cat-toy>"`
(a registered token as the init: its vectors, not the spelling of the word).

The run records where it starts as its one --init word, `registry:NAME@SHA256` (spec.json's
"init"), so a resumed run, or another process of it, starts from the very same vectors: both
backends' tokens.py turn that word into rows through `start_vectors`, which refuses an entry
whose content changed since. The vector count is the entry's; the model's family must be the
embedding's (checked here from the spec and the model folder, before the model loads, and
again against the loaded text encoders' widths).

Imports neither torch nor jax.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import OptionError, TextinvError
from ..untrusted import quoted, shown

PREFIX = "registry:"
_SHA = re.compile(r"[0-9a-f]{64}")


def init_words(init: str) -> list[str]:
    """--init as words: split on spaces and commas ("toy figure", "toy,figure")."""
    return [w for w in init.replace(",", " ").split() if w]


def reference(entry) -> str:
    """The --init word a run records for a registry entry."""
    return f"{PREFIX}{entry.name}@{entry.sha256}"


def parse(words: list[str]) -> tuple[str, str] | None:
    """(name, sha256) when the --init words are a registry reference; None for plain words."""
    if not any(isinstance(w, str) and w.startswith(PREFIX) for w in words):
        return None
    if len(words) != 1:
        raise OptionError("A registered embedding as --init starts every vector: pass it alone.",
                          'For example --init "<cat-toy>" or --from cat-toy.')
    name, _, sha = words[0][len(PREFIX):].rpartition("@")
    if not name or not _SHA.fullmatch(sha):
        raise OptionError(f"--init {quoted(words[0])} is not a registry reference (registry:NAME@SHA256).",
                          "Pass --from NAME to start from a registered embedding.")
    return name, sha


def start_options(ctx, token: str | None, init: str | None, from_name: str | None,
                  vectors: int) -> tuple[str, list[str], int, str | None]:
    """train's --token/--init/--from/--vectors -> (token, init words, vectors, registry name
    started from). `--from NAME` or an --init that is one registered token starts from that
    entry: its token is the default --token and its vector count the run's (--vectors must
    match or be left out)."""
    if from_name is not None and init is not None:
        raise OptionError("--from and --init both say where the vectors start.", "Pass one of them.")
    words = init_words(init) if init is not None else []
    entry = None
    if from_name is not None:
        entry = _entry(from_name, by="name")
    elif len(words) == 1 and _looks_like_token(words[0]):
        entry = _entry(words[0], by="token")
    elif any(_looks_like_token(w) for w in words):
        raise OptionError(f"--init {quoted(init)} mixes a token with words: a registered embedding starts every "
                          "vector, so it comes alone.", 'Pass --init "<cat-toy>" alone, or only plain words.')
    if entry is None:
        if token is None:
            raise OptionError("Missing option '--token'.", 'Pass the new token, e.g. --token "<cat-toy>".')
        if init is None:
            raise OptionError("Missing option '--init'.", "Pass the word(s) the vectors start from, e.g. --init toy, "
                                                          "or --from NAME to continue a registered embedding.")
        return token, words, vectors, None
    if _given(ctx, "vectors") and vectors != entry.n_vectors:
        raise OptionError(f"--vectors {vectors} does not match {shown(entry.name)}, which has "
                          f"{entry.n_vectors} vector(s).", "Leave --vectors out: the run keeps the entry's count.")
    return (token if token is not None else entry.token), [reference(entry)], entry.n_vectors, entry.name


def _given(ctx, name: str) -> bool:
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is not None and source.name != "DEFAULT"


def _looks_like_token(word: str) -> bool:
    """`<cat-toy>`: bracketed text is never a word a model knows, so it names a registered token."""
    return len(word) > 2 and word.startswith("<") and word.endswith(">")


def _entry(wanted: str, by: str):
    from ..registry.store import Registry

    registry = Registry()
    if by == "name":  # a name, or a token's active entry, as every command takes them
        entry = registry.resolve(wanted)
    else:
        from ..errors import NotFoundError

        try:  # the token's active entry (registry/store.resolve: one rule for every command)
            entry = registry.resolve(wanted)
        except NotFoundError:
            raise TextinvError(f"--init {quoted(wanted)} looks like a token, but no registered embedding has it.",
                               "See the registered tokens with: textinv list (or pass a plain word: --init toy)"
                               ) from None
    if getattr(entry, "damaged", None):
        raise TextinvError(f"The registry entry {shown(entry.name)} is damaged: {entry.damaged}.",
                           "See textinv list --repair.")
    return entry


def check_model_family(start_name: str | None, model_family: str | None, model_name: str) -> None:
    """Before the model loads: the entry's family must be the model's (None: a Hub id, checked
    against the loaded encoders' widths instead)."""
    if start_name is None or model_family is None:
        return
    from ..registry.store import Registry

    entry = Registry().get(start_name)
    if entry is not None and entry.family != model_family:
        raise _family_error(entry.name, entry.family, model_name, model_family, entry.meta.get("base_model"))


def _family_error(name: str, family: str, model_name: str, model_family: str, base: str | None,
                  detail: str = "") -> TextinvError:
    import shlex

    from ..families import FAMILY_NAMES

    theirs = FAMILY_NAMES.get(family, family)
    message = (f"{shown(name)} is a {theirs} embedding but {model_name} is "
               f"{FAMILY_NAMES.get(model_family, model_family)}: a run continuing it needs a {theirs} model.")
    if detail:
        message += f" ({detail})"
    hint = (f"Pass --model {shlex.quote(base)} (the model it was trained on)." if base
            else f"Pass --model with a {theirs} model.")
    return TextinvError(message, hint)


def start_embedding(words: list[str]):
    """The registered embedding a run starts from, or None for plain --init words."""
    ref = parse(list(words))
    if ref is None:
        return None
    from ..registry.store import Registry

    name, sha = ref
    registry = Registry()
    entry = registry.get(name)
    if entry is None or entry.sha256 != sha:  # renamed, or a version replaced: the same content elsewhere
        entry = next((e for e in registry.entries() if e.sha256 == sha and not getattr(e, "damaged", None)), None)
    if entry is None:
        raise TextinvError(f"The run starts from the registered embedding {shown(name)} ({sha[:12]}), "
                           "which the registry no longer holds with that content.",
                           "Import that embedding file again (textinv import FILE), then run this again.")
    return registry.load(entry)


def start_vectors(words: list[str], n: int, widths: dict[str, int], *, model_name: str,
                  model_family: str) -> dict[str, np.ndarray] | None:
    """{slot: float32 [n, width]} the rows start from, per the model's text-encoder slots
    (`widths`: slot -> the encoder's width), or None for plain --init words. A one-encoder
    model takes any one-slot embedding of its width (as sampling does); SDXL needs both."""
    emb = start_embedding(words)
    if emb is None:
        return None
    if emb.n_vectors != n:
        raise TextinvError(f"The run has {n} vector(s) but {shown(emb.token)} has {emb.n_vectors}.",
                           "Start a new run with --from NAME and no --vectors.")
    have = {s: int(v.shape[1]) for s, v in emb.vectors.items()}
    if len(widths) == 1 and len(have) == 1:
        plan = {next(iter(widths)): next(iter(emb.vectors.values()))}
    else:
        plan = {s: emb.vectors[s] for s in widths if s in emb.vectors} if set(have) == set(widths) else {}
    if plan and all(v.shape[1] == widths[s] for s, v in plan.items()):
        return {s: np.asarray(v, np.float32).copy() for s, v in plan.items()}
    detail = (f"its vectors are {', '.join(f'{s} {w}' for s, w in sorted(have.items()))} wide; the model's text "
              f"encoder{'s take' if len(widths) > 1 else ' takes'} {', '.join(str(w) for w in widths.values())}")
    if emb.family == model_family:
        raise TextinvError(f"{shown(emb.token)} does not fit {model_name}: {detail}.",
                           "It was made for another model size; pass --model with the model it was trained for.")
    raise _family_error(emb.token, emb.family, model_name, model_family, emb.meta.get("base_model"), detail)


def init_meta(spec) -> dict[str, str]:
    """What an embedding's metadata says about its start: {"init_from": "NAME@SHA12"} when the
    run continued a registered embedding, else the --init words."""
    ref = parse(list(spec.init))
    if ref is not None:
        return {"init_from": f"{ref[0]}@{ref[1][:12]}"}
    return {"init": " ".join(spec.init)}

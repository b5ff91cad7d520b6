"""textinv push: a registered embedding to a Hub repo, in one commit, with a model card.

What goes into the repo (all built in memory, uploaded with one create_commit):
  learned_embeds.safetensors [+ learned_embeds_2.safetensors]  diffusers (SDXL: the pair);
        what load_textual_inversion(repo) and `textinv pull` read
  learned_embeds.bin, token_identifier.txt, type_of_concept.txt  sd-concepts-library side
        files, so older loaders keep working (.bin for SD 1.x / 2.x only)
  NAME.pt (--format a1111), NAME.safetensors (--format kohya)     for A1111 / ComfyUI / kohya
  samples/*.png                                                    a trained run's validation images
  README.md                                                        the model card (model_card.py)

Nothing that holds an access token is ever pushed (once, a token_identifier.txt linked to
~/.cache/huggingface/token was imported, then pushed in three places). Registration refuses such
tokens and drops such metadata, but the user's tokens may have changed since, or registry.db been
edited: no_secrets() checks everything about to leave, token, metadata, every file and the commit
message, against embedding.holds_credential, before the repo is even created.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError, UnsupportedFormatError
from ..families import FAMILY_NAMES, TRAINABLE_FAMILIES
from .client import (DEFAULT_REVISION, TOKEN_FILE, TYPE_FILE, hub_errors, hub_token, offline, quiet_progress,
                     repo_id_from)

PUSH_FORMATS = ("safetensors", "a1111", "kohya")
MAX_IMAGES, MAX_IMAGE_BYTES = 16, 10 * 2**20     # validation previews, not a dataset


@dataclass
class PushResult:
    repo: str
    url: str
    branch: str
    commit: str
    commit_url: str
    files: list[str]
    private: bool
    changed: bool          # False: the repo already held exactly these files (no new commit)


def push(name: str, repo: str, *, private: bool = False, branch: str | None = None, message: str | None = None,
         formats: list[str] | tuple = (), license: str | None = None) -> PushResult:
    from .model_card import render_card
    from ..registry.store import Registry

    repo_id = repo_id_from(repo, "push")
    branch = branch or DEFAULT_REVISION
    unknown = [f for f in formats if f not in PUSH_FORMATS]
    if unknown:
        raise UnsupportedFormatError(f"Cannot push as {', '.join(unknown)}.",
                                     "--format takes: " + ", ".join(PUSH_FORMATS) + " (repeatable).")
    if offline():
        raise HubError("Pushing needs the network, and HF_HUB_OFFLINE is set.", "Unset HF_HUB_OFFLINE and try again.")
    if hub_token() is None:  # checked before anything is built or sent
        raise HubError("Pushing needs a Hugging Face access token with write access; none is configured.",
                       "Log in with `hf auth login`, or set HF_TOKEN to a write token "
                       "(https://huggingface.co/settings/tokens).")
    registry = Registry()
    entry = registry.resolve(name)
    emb = _public(registry.load(entry))
    if emb.family not in TRAINABLE_FAMILIES:  # SD3/Flux: the repo layout below is diffusers', which has no loader for them
        import shlex

        raise UnsupportedFormatError(
            f"textinv pushes diffusers-style repos, and diffusers loads no {FAMILY_NAMES[emb.family]} embeddings.",
            f"Write the files with `textinv convert {shlex.quote(entry.name)} --to comfyui` (or --to onetrainer), "
            f"then upload them with `hf upload {repo_id} FILE`.")
    files = repo_files(emb, formats)
    files.update(validation_images(entry))
    files["README.md"] = render_card(entry, emb, repo_id=repo_id, files=files,
                                     license=license or "creativeml-openrail-m").encode()
    message = message or f"Upload {emb.token} textual inversion embedding (textinv)"
    no_secrets(entry, emb, files, message)
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    with hub_errors(repo_id, branch, "push to"), quiet_progress():
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        info = api.model_info(repo_id)
        if private and not info.private:
            # Uploading would publish what the user wanted private: refuse instead.
            raise HubError(f"{repo_id} already exists and is public; --private does not change an existing repo.",
                           f"Make it private in its settings ({url}/settings) first, or push without --private.")
        if branch != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        before = api.model_info(repo_id, revision=branch).sha if branch != DEFAULT_REVISION else info.sha
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in files.items()]
        commit = api.create_commit(repo_id, ops, revision=branch,
                                   commit_message=message)
    page = str(url) if branch == DEFAULT_REVISION else f"{url}/tree/{branch}"
    return PushResult(repo_id, page, branch, commit.oid, commit.commit_url, sorted(files), bool(info.private),
                      commit.oid != before)


def no_secrets(entry, emb, files: dict[str, bytes], message: str) -> None:
    """HubError, quoting nothing it found, when anything about to be pushed holds an access token:
    shaped like one, or one of the user's own (including the one this push authenticates with)."""
    from ..embedding import holds_credential
    from ..redact import known_tokens
    from ..registry.names import rm_command

    known = known_tokens()  # huggingface_hub is loaded by now: this includes the token it sends
    fix = f"Remove it (`{rm_command(entry.name)}`) and import it again with --token '<a-word>'; " \
          "new imports drop metadata that holds a token."
    found = None
    if holds_credential(emb.token, known):
        found = "Its token"
    elif any(holds_credential(k, known) or holds_credential(v, known) for k, v in emb.meta.items()):
        found = "Its metadata"
    elif holds_credential(message, known):
        found, fix = "The commit message", "Pass --message without it."
    else:
        for path, data in sorted(files.items()):
            # latin-1 maps bytes to characters one to one: a token's ASCII shows through whatever
            # surrounds it. Validation images are only searched for the user's own tokens (their
            # pixels would match token shapes by chance, and textinv wrote them).
            text = data.decode("latin-1")
            if any(t in text for t in known) or (not path.startswith("samples/") and holds_credential(text, known)):
                found = f"The file {path}"
                break
    if found:
        raise HubError(f"{found} holds what looks like an access token (or is one of yours); nothing was pushed.",
                       fix)


def repo_files(emb, formats) -> dict[str, bytes]:
    """The embedding's files for the repo (everything but images and the card)."""
    from ..embedding import safe_name
    from ..formats import WRITERS, layouts
    from ..formats.folders import CONCEPT_SAFE, concept_files, sdxl_pair_files
    from ..formats.pickle_writer import dump_torch_pickle
    from ..formats.safetensors_io import dump_safetensors

    files: dict[str, bytes] = {}
    if emb.family == "sdxl":
        files.update(sdxl_pair_files(emb))
        files[TOKEN_FILE] = emb.token.encode()
        files[TYPE_FILE] = (emb.meta.get("learnable_property") or "object").encode()
    else:
        files[CONCEPT_SAFE] = dump_safetensors(layouts.diffusers_dict(emb), layouts.diffusers_metadata(emb))
        files.update(concept_files(emb))
    stem = safe_name(emb.token)
    if stem.startswith("learned_embeds"):  # would collide with (or pair up with) the diffusers files
        stem += "-embedding"
    for fmt, path, build in (("a1111", f"{stem}.pt", lambda: dump_torch_pickle(layouts.a1111_dict(emb))),
                             ("kohya", f"{stem}.safetensors",
                              lambda: dump_safetensors(layouts.kohya_dict(emb), layouts.kohya_metadata(emb)))):
        if fmt not in formats:
            continue
        if emb.family not in WRITERS[fmt].families:
            able = [f for f in PUSH_FORMATS if f != "safetensors" and emb.family in WRITERS[f].families]
            raise UnsupportedFormatError(f"The {fmt} format cannot hold an {emb.family} embedding.",
                                         "Formats that can: " + (", ".join(able) or "none") + ".")
        files[path] = build()
    return files


def validation_images(entry) -> dict[str, bytes]:
    """A trained run's samples/*.png, if its run folder is still there."""
    run = entry.origin.get("run") if entry.source == "trained" else None
    samples = Path(run) / "samples" if run else None
    if samples is None or not samples.is_dir():
        return {}
    from ..errors import TextinvError
    from ..fsutil import read_head

    images = {}
    for p in sorted(p for p in samples.rglob("*.png") if p.is_file())[-MAX_IMAGES:]:
        try:  # a regular file of its folder, read bounded: never a link out, a device or /proc
            data = read_head(p, MAX_IMAGE_BYTES + 1, within=p.parent)
        except TextinvError:
            continue  # not an image textinv wrote: leave it out of a public repo
        if len(data) <= MAX_IMAGE_BYTES:
            images["samples/" + p.relative_to(samples).as_posix()] = data
    return images


def _public(emb):
    """The embedding minus meta values that are local paths: a public file must not leak them."""
    from ..embedding import Embedding
    from .model_card import is_local_path

    return Embedding(emb.token, emb.vectors, {k: v for k, v in emb.meta.items() if not is_local_path(v)})

"""The trainable rows: placeholder tokens in the tokenizer, their vectors spliced into the
text encoder's token embedding.

diffusers' script resizes the 49k-row embedding matrix, hands all of it to AdamW and copies
the old rows back after every step. We never touch that matrix: the tokenizer gets the new
tokens (diffusers' multi-vector names `<tok>`, `<tok>_1`, ... `<tok>_{n-1}`, so a file we
write loads with `load_textual_inversion` and gets the same ids), and the encoder's
`token_embedding` is wrapped so ids >= first_id read from an fp32 parameter [n, width]
instead. The optimizer sees n x width numbers; the frozen matrix may be fp16/bf16.

Captions become id tables here too (tokenize_captions), since the ids depend on the
placeholder's names and first id; and sampling adds registered embeddings to a pipeline's
text encoder(s) here (add_embeddings), as the JAX backend's tokens.py does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textinv_cli.engine.captions import add_placeholder_tokens, expand_placeholder, init_token_ids
from textinv_cli.engine.checks import check_token
from textinv_cli.engine.infotext import model_label
from textinv_cli.engine.init_from import start_vectors
from textinv_cli.errors import TextinvError
from textinv_cli.engine.quiet_libraries import quiet


def init_rows(tokenizer, weight: torch.Tensor, words: list[str], n: int, label: str = "tokenizer") -> torch.Tensor:
    """Start vectors [n, width] (fp32) from the embeddings of the --init words' tokens
    (which tokens: `captions.init_token_ids`, shared with the JAX backend)."""
    ids = torch.tensor(init_token_ids(tokenizer, words, n, label), dtype=torch.long)
    return weight.detach()[ids].to(torch.float32).clone()


class RowSplice(nn.Module):
    """Wraps a frozen nn.Embedding: ids >= first_id read rows[id - first_id] instead.

    `rows` is held as a plain attribute, not a registered parameter, so `.to(dtype)`,
    `requires_grad_(False)` or a state_dict of the text encoder never touch it: it stays
    fp32 and trainable, and is cast to the compute dtype here, in the forward pass.
    torch.where (not a boolean index) keeps the graph free of host syncs and shape changes.
    """

    def __init__(self, base: nn.Embedding, rows: torch.Tensor, first_id: int):
        super().__init__()
        self.base = base
        object.__setattr__(self, "rows", rows)
        self.first_id = int(first_id)

    @property
    def weight(self) -> torch.Tensor:  # code that asks an embedding for its dtype/device
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Only our n ids: tokens added after ours (another embedding) are not ours to answer.
        new = (ids >= self.first_id) & (ids < self.first_id + self.rows.shape[0])
        out = self.base(torch.where(new, torch.zeros_like(ids), ids))
        local = (ids - self.first_id).clamp(0, self.rows.shape[0] - 1)
        extra = F.embedding(local, self.rows.to(out.dtype))
        return torch.where(new.unsqueeze(-1), extra, out)


def _embeddings(text_encoder) -> nn.Module:
    """CLIPTextEmbeddings: under .text_model in transformers 4, at the top in 5."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.embeddings


def token_embedding(text_encoder) -> nn.Module:
    return _embeddings(text_encoder).token_embedding


def splice(text_encoder, rows: torch.Tensor, first_id: int) -> RowSplice:
    """Install the splice (idempotent: re-splicing replaces the rows)."""
    emb = _embeddings(text_encoder)
    base = emb.token_embedding.base if isinstance(emb.token_embedding, RowSplice) else emb.token_embedding
    emb.token_embedding = RowSplice(base, rows, first_id)
    return emb.token_embedding


def prepare_rows(comp, token: str, words: list[str], n: int) -> list[tuple[int, torch.Tensor]]:
    """Add the placeholder to every tokenizer; (first id, fp32 init [n, width]) per encoder.

    Call while the text encoders are still fp32 (the init is read from full-precision
    weights, as diffusers does). A registry reference as the only word (engine/init_from)
    starts the rows from that embedding's vectors instead. Every check runs on every tokenizer before any is changed,
    so a refused token leaves the tokenizers as they were.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TextinvError(f"--vectors must be at least 1, not {n!r}.")
    labels = [f"{s} tokenizer" for s in comp.slots]
    for tok, label in zip(comp.tokenizers, labels):
        check_token(token, tok, label)
    # a registered embedding as the start (`train --from NAME`): its vectors, per encoder
    widths = {s: int(token_embedding(te).weight.shape[-1]) for s, te in zip(comp.slots, comp.text_encoders)}
    start = start_vectors(words, n, widths, model_name=model_label(comp.model), model_family=comp.family)
    if start is not None:
        inits = [torch.from_numpy(start[s]) for s in comp.slots]
    else:
        inits = [init_rows(tok, token_embedding(te).weight, words, n, label)
                 for tok, te, label in zip(comp.tokenizers, comp.text_encoders, labels)]
    return [(add_placeholder_tokens(tok, token, n, label), init)
            for tok, init, label in zip(comp.tokenizers, inits, labels)]


def install_rows(comp, prepared: list[tuple[int, torch.Tensor]], device=None) -> dict[str, torch.Tensor]:
    """Trainable fp32 leaves on `device`, spliced into each text encoder: {slot: [n, width]}."""
    rows = {}
    for slot, te, (first, init) in zip(comp.slots, comp.text_encoders, prepared):
        r = init.detach().to(device or token_embedding(te).weight.device, torch.float32).clone().requires_grad_(True)
        splice(te, r, first)
        rows[slot] = r
    return rows


def setup_rows(comp, token: str, words: list[str], n: int, device=None) -> dict[str, torch.Tensor]:
    """prepare_rows + install_rows, for callers that keep the encoders where they are."""
    return install_rows(comp, prepare_rows(comp, token, words, n), device)


def tokenize_captions(comp, captions: list[list[str]], token: str,
                      n: int) -> tuple[list[torch.Tensor], list[list[int]], int]:
    """Each distinct caption tokenized once per tokenizer: (id tables [U, L], per-image
    indices into them, how many captions lose the placeholder to truncation)."""
    unique: dict[str, int] = {}
    choices = [[unique.setdefault(c, len(unique)) for c in caps] for caps in captions]
    texts = [expand_placeholder(c, token, n) for c in unique]
    tables, truncated = [], 0
    for tok, (first, _) in zip(comp.tokenizers, comp.prepared):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        truncated = max(truncated, int((~(ids >= first).any(dim=1)).sum()))
        tables.append(ids)
    return tables, choices, truncated


# -- embeddings for sampling -----------------------------------------------------------------------

def _targets(pipe):
    """slot groups -> (tokenizer, text_encoder): which encoder each slot feeds."""
    if hasattr(pipe, "text_encoder_2"):
        return {"clip_l": (pipe.tokenizer, pipe.text_encoder), "clip_g": (pipe.tokenizer_2, pipe.text_encoder_2)}
    return {None: (pipe.tokenizer, pipe.text_encoder)}  # SD 1.x/2.x: the one slot, whatever its name


def _width(text_encoder) -> int:
    return int(text_encoder.get_input_embeddings().weight.shape[-1])


def check_fit(ref, pipe, info) -> dict:
    """{slot: (tokenizer, text_encoder)} for this embedding, or the family error naming both."""
    from textinv_cli.embedding import family_of
    from textinv_cli.engine.prompt_tokens import FAMILY_NAMES, family_mismatch_error

    slots = set(ref.vectors)
    try:
        emb_family = family_of(slots)
    except TextinvError:  # an odd slot set (not from our registry): name the slots instead
        emb_family = "+".join(sorted(slots)) or "empty"
    targets = _targets(pipe)
    if None in targets:
        plan = {s: targets[None] for s in slots} if len(slots) == 1 else {}
    else:
        plan = {s: targets[s] for s in slots} if slots == set(targets) else {}
    fits = bool(plan) and all(ref.vectors[s].shape[-1] == _width(te) for s, (_, te) in plan.items())
    if fits:
        return plan
    have = ", ".join(f"{s} {ref.vectors[s].shape[-1]}" for s in sorted(slots))
    want = ", ".join(f"{_width(te)}" for _, te in targets.values())
    detail = f"its vectors are {have} wide; the model's text encoder{'s take' if len(targets) > 1 else ' takes'} {want}"
    if emb_family == info["family"]:  # same family, other widths: e.g. a real SD 1.5 embedding on a tiny model
        raise TextinvError(
            f"{ref.token} does not fit {info['name']}: {detail}.",
            f"It was made for another {FAMILY_NAMES.get(emb_family, emb_family)} model size; "
            "pass --model with the model it was trained for.")
    raise family_mismatch_error(ref.token, emb_family, info["name"], info["family"], detail)


def add_embeddings(pipe, refs, info) -> None:
    """Each embedding into its text encoder(s) with diffusers' load_textual_inversion."""
    plans = [(ref, check_fit(ref, pipe, info)) for ref in refs]  # check all before changing any
    for ref, plan in plans:
        for tokenizer, _ in plan.values():
            vocab = tokenizer.get_vocab()
            if ref.token in vocab or f"{ref.token}_1" in vocab:
                raise TextinvError(
                    f"The token {ref.token} is already in {info['name']}'s vocabulary, "
                    "so the embedding cannot be added under it.",
                    "Import it again under an unused token: textinv import FILE --token \"<new-token>\".")
    with quiet(future_warnings=False):
        for ref, plan in plans:
            for slot, (tokenizer, text_encoder) in plan.items():
                vectors = torch.from_numpy(ref.vectors[slot]).to(torch.float32)
                pipe.load_textual_inversion(vectors, token=ref.token, tokenizer=tokenizer, text_encoder=text_encoder)

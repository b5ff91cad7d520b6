"""The model families and text-encoder slots, named once for the whole project.

No imports: the registry's row checks, the CLI's --family choices and the tiny-model recipe
use these without pulling in numpy. An embedding's slots name the text encoder they feed:
clip_l (768, SD 1.x, SDXL's first, SD3's and Flux's CLIP-L), clip_h (1024, SD 2.x), clip_g
(1280, SDXL's second, SD3's CLIP-G), t5 (4096, the T5-XXL of SD3 and Flux). For SD 1.x/2.x/XL
the family follows from the slots. SD3 and Flux embeddings may lack the slots whose encoder
was not trained (an SD3 file with clip_l + clip_g looks like SDXL), so for those the family
may be declared by the file or the user (embedding.Embedding.declared_family).
"""

FAMILY_SLOTS = {
    "sd1": ("clip_l",),
    "sd2": ("clip_h",),
    "sdxl": ("clip_l", "clip_g"),
    "sd3": ("clip_l", "clip_g", "t5"),
    "flux": ("clip_l", "t5"),
}
FAMILIES = tuple(FAMILY_SLOTS)  # every family an embedding can have
# The families textinv can train (and build tiny models of): there are no SD3/Flux backends.
TRAINABLE_FAMILIES = ("sd1", "sd2", "sdxl")
# Families whose embeddings may hold a subset of their slots (an encoder left untrained).
PARTIAL_FAMILIES = ("sd3", "flux")
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                "sd3": "Stable Diffusion 3", "flux": "FLUX.1"}
SINGLE_SLOT_FAMILIES = tuple(f for f, slots in FAMILY_SLOTS.items() if len(slots) == 1)
SLOT_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280, "t5": 4096}
# How the family of an embedding read from a file was decided (Embedding.meta["family_source"]).
FAMILY_SOURCES = ("slots", "key names", "file metadata", "--family")


def default_family(slots) -> str | None:
    """The family a set of slots means without any declaration, or None when the slots alone
    cannot say (a lone t5 or clip_g: SD3 or Flux or another T5 model) or fit no family.

    The full slot set of each family, plus the partial SD3/Flux sets that no other family
    has: t5 beside CLIP-L only is Flux (SD3 lacking clip_g is the rarer case and needs a
    declaration), clip_g beside t5 is SD3."""
    s = frozenset(slots)
    for family, fam_slots in FAMILY_SLOTS.items():
        if s == frozenset(fam_slots):
            return family
    if s == {"clip_g", "t5"}:
        return "sd3"
    return None


def family_can_hold(family: str, slots) -> bool:
    """Whether an embedding of `family` may have exactly these slots: all of them for
    SD 1.x/2.x/XL, any non-empty subset for SD3/Flux."""
    fam_slots = FAMILY_SLOTS.get(family)
    s = frozenset(slots)
    if fam_slots is None or not s:
        return False
    return s <= frozenset(fam_slots) if family in PARTIAL_FAMILIES else s == frozenset(fam_slots)

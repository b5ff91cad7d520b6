"""The model families and text-encoder slots, named once for the whole project.

No imports: the registry's row checks, the CLI's --family choices and the tiny-model recipe
use these without pulling in numpy. An embedding's slots name the text encoder they feed:
clip_l (768, SD 1.x and SDXL's first encoder), clip_h (1024, SD 2.x), clip_g (1280, SDXL's
second); the family follows from the slots.
"""

FAMILY_SLOTS = {
    "sd1": ("clip_l",),
    "sd2": ("clip_h",),
    "sdxl": ("clip_l", "clip_g"),
}
FAMILIES = tuple(FAMILY_SLOTS)  # ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
SINGLE_SLOT_FAMILIES = tuple(f for f, slots in FAMILY_SLOTS.items() if len(slots) == 1)
SLOT_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}

"""The samplers, named once: A1111's name (what `--scheduler` takes, what the PNG parameters
block says and what `--params-from` reads back), our short key (what a SampleRequest holds
and a backend declares), and the diffusers scheduler the torch backend builds for it.

The diffusers classes and configs follow diffusers' own "A1111/k-diffusion -> Diffusers"
table (docs: api/schedulers/overview): DPM++ 2M is DPMSolverMultistepScheduler, "Karras"
is `use_karras_sigmas=True`; DPM++ SDE Karras is k-diffusion's sample_dpmpp_sde (A1111:
second order, Brownian noise, Karras sigmas), which diffusers ported as DPMSolverSDEScheduler
(its Brownian tree needs the torchsde package). Nothing here imports torch or diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    key: str                    # SampleRequest.scheduler, backend declarations ("dpm++")
    name: str                   # A1111's name ("DPM++ 2M"): --scheduler, infotext
    diffusers: str              # the diffusers scheduler class
    config: dict = field(default_factory=dict)  # extra config over the model's own scheduler config
    needs: str | None = None    # a Python package the scheduler imports (pip name = module name)
    aliases: tuple[str, ...] = ()


# In A1111's menu order. The keys ddim, euler, euler-a, dpm++ and unipc are textinv's earlier --scheduler names.
TABLE: tuple[Sampler, ...] = (
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("euler-a", "Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("dpm++", "DPM++ 2M", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2}, aliases=("dpm++-2m",)),
    Sampler("dpm++-karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
            aliases=("dpm++-2m-karras",)),
    Sampler("dpm++-sde-karras", "DPM++ SDE Karras", "DPMSolverSDEScheduler", {"use_karras_sigmas": True},
            needs="torchsde"),
    # A1111's DDIM (ldm's DDIMSampler) neither clips the predicted image nor steps to alpha 1 at
    # the end; diffusers' DDIMScheduler does both by default for a config that does not say (SD 1.x's
    # PNDM config, SDXL's Euler config), which draws other pictures than A1111 and our validation.
    Sampler("ddim", "DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    Sampler("heun", "Heun", "HeunDiscreteScheduler"),
    Sampler("lms", "LMS", "LMSDiscreteScheduler"),
)

NAMES: tuple[str, ...] = tuple(s.name for s in TABLE)   # what --scheduler lists
KEYS: tuple[str, ...] = tuple(s.key for s in TABLE)


def _fold(text: str) -> str:
    return " ".join(str(text).split()).casefold()


_BY_SPELLING: dict[str, Sampler] = {}
for _s in TABLE:
    for _spelling in (_s.name, _s.key, *_s.aliases):
        _BY_SPELLING.setdefault(_fold(_spelling), _s)


def find(name) -> Sampler | None:
    """The sampler `name` spells (A1111's name or our key, any case, any spacing); None if none."""
    if not isinstance(name, str) or len(name) > 100:
        return None
    return _BY_SPELLING.get(_fold(name))


def get(name) -> Sampler:
    """find(name), or KeyError."""
    found = find(name)
    if found is None:
        raise KeyError(name)
    return found


def key_of(name) -> str | None:
    found = find(name)
    return found.key if found else None


def a1111_name(name) -> str:
    """A1111's name for `name` (as given, when it is none of ours)."""
    found = find(name)
    return found.name if found else str(name)


def from_infotext(sampler: str, schedule_type: str | None = None) -> str:
    """The sampler name an A1111 parameters block means. A1111 >= 1.9 writes the schedule
    apart (`Sampler: DPM++ 2M, Schedule type: Karras`); older versions one name
    (`Sampler: DPM++ 2M Karras`). 'Automatic' (or none) keeps the sampler as written;
    'Karras' names the Karras variant (DPM++ SDE + Karras is DPM++ SDE Karras). Another
    schedule type gives a name that find() refuses (with the list)."""
    schedule = (schedule_type or "").strip()
    if not schedule or schedule.casefold() == "automatic":
        return sampler
    if schedule.casefold() == "karras" and find(sampler + " Karras") is not None:
        return sampler + " Karras"
    if schedule.casefold() == "karras" and sampler.casefold().endswith(" karras") and find(sampler):
        return sampler
    return f"{sampler} ({schedule})"

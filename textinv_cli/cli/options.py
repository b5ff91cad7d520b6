"""Options several commands share, checked where typer parses them (a bad value: exit 2)."""

from __future__ import annotations

from ..errors import TextinvError
from ..fsutil import max_bytes_from_mib


def max_size_option(value: float | None) -> float | None:
    """typer callback for every --max-size option: a bad value is a usage error (exit 2)."""
    import typer

    try:
        max_bytes_from_mib(value)
    except TextinvError as e:
        raise typer.BadParameter(e.message) from None
    return value


FAMILY_HELP = ("The model family, where the file does not say it: sd3 or flux for an SD3/Flux embedding "
               "that holds only some encoders (e.g. clip_l alone): sd1, sd2, sdxl, sd3 or flux.")


def family_option(value: str | None) -> str | None:
    """typer callback for --family on commands that read an embedding: a family name
    (families.FAMILIES), else a usage error (exit 2). Apply it with Embedding.with_family,
    which refuses a family that cannot hold the file's slots."""
    import typer

    from ..families import FAMILIES

    if value is None:
        return None
    if value not in FAMILIES:
        raise typer.BadParameter(f"must be one of {', '.join(FAMILIES)}, not {value!r}.")
    return value


# --model, --prediction and --vae of train and sample (cli/base_model.py prepares what they name).
MODEL_HELP = ("A .safetensors/.ckpt checkpoint (SD 1.x, 2.x, XL; converted once, cached), a name in your model "
              "folders (textinv models), a diffusers folder, a Hub id, or tiny / tiny-sd2 / tiny-sdxl (default: tiny, "
              "a random-weight model for trying textinv out; set yours once: textinv config set model, or "
              "TEXTINV_MODEL).")
PREDICTION_HELP = ("For a single-file checkpoint that does not say what it predicts: epsilon (SD 1.x, XL, SD 2.x "
                   "512 px) or v (SD 2.x 768 px, v-pred models).")
VAE_HELP = "A VAE file to use instead of the model's, as A1111's SD VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors)."
PREDICTIONS = ("epsilon", "v")
# Other tools' words for the two (diffusers' prediction_type: v_prediction): ours.
_PREDICTION_WORDS = {"epsilon": "epsilon", "eps": "epsilon", "v": "v", "v_prediction": "v", "v-prediction": "v"}


def prediction_option(value: str | None) -> str | None:
    """typer callback for --prediction: epsilon or v (diffusers' v_prediction too), else exit 2."""
    import typer

    if value is None:
        return None
    word = _PREDICTION_WORDS.get(value.strip().lower())
    if word is None:
        raise typer.BadParameter(f"must be epsilon or v, not {value!r}.")
    return word

"""Validation images' A1111 block and `sample --grid`'s contact sheet (engine/infotext.py),
without a model: images are drawn with PIL."""

from __future__ import annotations

import numpy as np
from PIL import Image

from textinv_cli.embedding import Embedding
from textinv_cli.engine.infotext import encode_png, grid_rows, validation_text, with_grid
from textinv_cli.engine.spec import Event, TrainSpec


def test_grid_shape_is_a1111s_default():
    assert [grid_rows(n) for n in (1, 2, 3, 4, 5, 6, 8, 9, 10)] == [1, 1, 2, 2, 2, 2, 3, 3, 3]


def test_with_grid_writes_a_sheet_with_the_first_images_parameters(tmp_path):
    paths = []
    for i, color in enumerate(["red", "green", "blue"]):
        p = tmp_path / f"{i:05d}-{i}.png"
        p.write_bytes(encode_png(Image.new("RGB", (8, 6), color), f"prompt {i}\nSteps: 2, Seed: {i}"))
        paths.append(str(p))
    events = [Event("sample", {"path": p}) for p in paths]
    events.append(Event("finished", {"paths": paths, "out_dir": str(tmp_path), "seconds": 0.1}))
    out = list(with_grid(iter(events), tmp_path))
    assert [e.kind for e in out] == ["sample"] * 3 + ["finished"]
    grid = out[-1].data["grid"]
    assert grid == str(tmp_path / "grid-0000.png")
    with Image.open(grid) as im:
        assert im.size == (16, 12) and im.info["parameters"] == "prompt 0\nSteps: 2, Seed: 0"
        px = np.asarray(im.convert("RGB"))
    assert tuple(px[0, 0]) == (255, 0, 0) and tuple(px[0, 8]) == (0, 128, 0) and tuple(px[6, 0]) == (0, 0, 255)
    assert tuple(px[6, 8]) == (0, 0, 0)  # the empty cell of a 2 x 2 sheet
    again = list(with_grid(iter(events), tmp_path))[-1].data["grid"]
    assert again == str(tmp_path / "grid-0001.png")  # never overwrites an earlier sheet


def test_validation_text_names_the_run_settings_and_the_embedding_hash():
    spec = TrainSpec(data_dir="d", token="<v-toy>", init=["toy"], model="runwayml/stable-diffusion-v1-5", run_dir="r",
                     seed=7, validate_steps=20, name="v-toy")
    rows = {"clip_l": np.arange(8, dtype=np.float32).reshape(1, 8)}
    text = validation_text(spec, prompt="a photo of <v-toy>, on a table", index=2, resolution=512, vectors=rows)
    short = Embedding("<v-toy>", rows).content_sha256()[:12]
    assert text.splitlines()[0] == "a photo of <v-toy>, on a table"
    assert text.splitlines()[1].startswith(
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 9, Size: 512x512, Model: runwayml/stable-diffusion-v1-5, "
        f'TI hashes: "v-toy: {short}", Version: textinv ')


def test_one_image_makes_no_grid_and_says_so(tmp_path):
    p = tmp_path / "00000-0.png"
    p.write_bytes(encode_png(Image.new("RGB", (8, 8)), "x"))
    done = Event("finished", {"paths": [str(p)], "out_dir": str(tmp_path), "seconds": 0.1})
    out = list(with_grid(iter([done]), tmp_path))
    assert [e.kind for e in out] == ["warning", "finished"] and "grid" not in out[-1].data
    assert "-n 2" in out[0].data["message"] and not list(tmp_path.glob("grid-*"))

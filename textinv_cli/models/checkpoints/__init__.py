"""Single-file Stable Diffusion checkpoints (.safetensors, torch.save .ckpt): read by seeking,
never loaded whole and never unpickled (reader.py), written (writer.py), hashed (hashes.py), and
converted to a cached diffusers folder (convert.prepare / prepare_vae: architectures.py, ldm_keys.py,
plan.py, clip_vocab.py, cache.py)."""

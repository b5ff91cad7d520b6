"""Single-file Stable Diffusion checkpoints (.safetensors, torch.save .ckpt): read by seeking,
never loaded whole and never unpickled (reader.py), written (writer.py), hashed (hashes.py)."""

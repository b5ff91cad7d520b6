"""textinv's JAX backend (entry point `jax` in the textinv.backends group).

It brings its own JAX ports of the Stable Diffusion parts (CLIP text encoder, UNet,
AutoencoderKL), since diffusers and transformers no longer ship Flax models, and imports
weights from the same diffusers folders the torch backend reads, without torch.

Importing this package is cheap: jax loads only when a submodule (clip, vae, nn, ...) is
imported, so the core can list backends without paying for jax.
"""

__version__ = "0.1.0"

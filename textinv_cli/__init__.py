"""textinv: Textual Inversion embeddings, from training to sharing.

Importing this package must stay cheap: no numpy-heavy work, never torch or jax.
"""

__version__ = "0.1.0"

"""textinv's PyTorch backend (entry point `torch` in the textinv.backends group).

Importing this package is cheap: torch, diffusers and transformers load only when the
backend is probed, trains or samples.
"""

__version__ = "0.1.0"

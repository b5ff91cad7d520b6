"""Base models: names resolved to folders, the built-in tiny models, nearest vocabulary tokens."""

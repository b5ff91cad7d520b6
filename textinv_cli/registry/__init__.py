"""The local registry: an SQLite index plus a content-addressed blob store (see ARCHITECTURE.md)."""

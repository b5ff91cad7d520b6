"""What the tests share: builders, corpora, doubles (the local Hub) and worker processes."""

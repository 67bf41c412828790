"""Reading what codes mean: code caches, search, precision/recall against concepts, plots."""

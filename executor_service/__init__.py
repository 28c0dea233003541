"""The executor service: holds every tensor (weights, paged KV pool, swap pool) and runs step plans."""

"""Speculative decoding in the scheduler: the configuration and the n-gram (prompt lookup) proposer."""

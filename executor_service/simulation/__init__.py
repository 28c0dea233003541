"""A simulated executor: the real Executor service and plan validation, a modelled step time, no model."""

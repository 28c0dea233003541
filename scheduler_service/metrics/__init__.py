"""Prometheus metrics of the scheduler under vLLM's names, plus pagewire's own."""

"""The scheduler service: every decision (admission, batching, block tables, preemption), no tensor."""

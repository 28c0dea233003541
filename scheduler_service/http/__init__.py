"""The OpenAI-compatible HTTP API of the scheduler (FastAPI on uvicorn, on the scheduler's event loop)."""

"""The model name the HTTP API and the metrics report: `--served-model-name`, else the checkpoint's."""

from __future__ import annotations

from scheduler_service.engine import Engine


def served_model_name(engine: Engine) -> str | None:
    """None while no executor has described its model and no name was configured."""
    if engine.config.served_model_name:
        return engine.config.served_model_name
    return engine.model.model_name if engine.model is not None else None

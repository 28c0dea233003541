"""structlog configured for both services: JSON lines on stderr, or readable lines on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time (a test's capture may replace and close it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", log_format: str = "json") -> None:
    """Routes structlog (and stdlib logging) to stderr at `level`.

    `log_format` json writes one JSON object per line; console a human-readable line; auto picks console
    when stderr is a terminal, else json.
    """
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}: use auto, json or console")
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    logging.basicConfig(stream=sys.stderr, level=numeric_level, format="%(message)s")
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # The console renderer formats exceptions itself.
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=True,
    )

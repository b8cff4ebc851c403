"""The daemon's log: ``event=NAME key=value ...`` lines, or one JSON object a line with
log_format = "json", and the engine's stderr relayed in the same format."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import IO, Any

# Every module of the daemon logs under this one name: it is in each log line (and the JSON
# "logger" field), and what operators filter the daemon's log by.
log = logging.getLogger("netkernel.daemon")


def _log_value(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


def log_event(event: str, level: int = logging.INFO, **fields: object) -> None:
    """``event=NAME key=value ...`` in the text log; the same as fields of the JSON object
    with log_format = "json"."""
    kept = {k: v for k, v in fields.items() if v is not None}
    text = " ".join([f"event={event}"] + [f"{k}={_log_value(v)}" for k, v in kept.items()])
    log.log(level, "%s", text, extra={"nk_fields": {"event": event, **kept}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line; events carry their fields as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        doc.update(getattr(record, "nk_fields", {}))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


TEXT_FORMAT = "%(asctime)s netkernel[%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, log_format: str = "text", stream: IO[str] | None = None) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


def engine_log_relay(pipe: IO[bytes]) -> None:
    """With JSON logs the engine's stderr lines (``engine: event=NAME k=v ...``) become JSON
    objects too, so that the whole log is one format."""
    engine_log = logging.getLogger("netkernel.engine")
    for raw in pipe:
        line = raw.decode(errors="replace").rstrip("\n")
        text = line.removeprefix("engine: ")
        fields: dict[str, str] = {}
        if text.startswith("event="):
            for word in text.split():
                key, sep, value = word.partition("=")
                if sep:
                    fields[key] = value
        engine_log.info("%s", text, extra={"nk_fields": fields})

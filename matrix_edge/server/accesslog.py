"""One entry per request: a line in the spirit of Synapse's request log, or
a JSON object for log shippers."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from matrix_edge.config.access_log import AccessLogConfig, AccessLogFormat
from matrix_edge.pools.keys import xmatrix_origin
from matrix_edge.server.accesslog_file import AccessLogFile
from matrix_edge.target import decode_query_component

if TYPE_CHECKING:
    from matrix_edge.server.request import EdgeRequest

# Query parameters whose values never reach a log.
_SECRETS = frozenset({b"access_token", b"client_secret"})


def redact_target(target: bytes) -> str:
    """The request target for logs: access tokens and client secrets in the
    query replaced by ``<redacted>``, however their names are escaped."""
    path, question, query = target.partition(b"?")
    if query:
        query = b"&".join(_redacted(part) for part in query.split(b"&"))
    return (path + question + query).decode("ascii", "backslashreplace")


def _redacted(part: bytes) -> bytes:
    name, equals, _value = part.partition(b"=")
    if not equals:
        return part
    # As Synapse reads it: `access%5Ftoken` is `access_token`.
    if decode_query_component(name) in _SECRETS:
        return name + b"=<redacted>"
    return part


class Timestamps:
    """RFC 3339 times in local time with milliseconds and the UTC offset
    (``2026-05-04T12:00:01.250+02:00``), as log shippers read them without
    a format of their own; the part that changes once a second is kept."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._prefix = ""
        self._offset = ""

    def format(self, now: float) -> tuple[str, float]:
        """The time C{now} as text, and as epoch seconds to the same
        millisecond."""
        second = int(now // 1)
        if second != self._second:
            local = time.localtime(second)
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", local)
            offset = time.strftime("%z", local)
            self._offset = f"{offset[:3]}:{offset[3:]}"
            self._second = second
        millis = min(int((now - second) * 1000), 999)
        return f"{self._prefix}.{millis:03d}{self._offset}", second + millis / 1000


class AccessLog:
    """Writes access entries for one listener through twisted.logger.

    Entries go to the ``matrix_edge.access.<tag>`` namespace at INFO, apart
    from ``/health`` and ``/ready`` probes, which are logged at DEBUG so that
    monitoring does not flood the log; or, with ``access_log.path``, to a
    file of their own (without the probes).

    In JSON, an entry is one object on one line that carries its own time
    (``time``, RFC 3339, and ``timestamp``, epoch seconds), a numeric
    ``status`` and durations in seconds as numbers, so that ``jq``, Loki and
    Vector read it as it is. The file gets exactly those lines; twistd's log
    gets the object as the message of its own line.
    """

    def __init__(
        self, tag: str, config: AccessLogConfig, file: AccessLogFile | None = None
    ):
        self._log = Logger(namespace=f"matrix_edge.access.{tag}")
        self._tag = tag
        self._enabled = config.enabled
        self._json = config.format is AccessLogFormat.JSON
        self._file = file
        self._timestamps = Timestamps()

    def log(self, request: EdgeRequest) -> None:
        if not self._enabled:
            return
        probe = request.path in (b"/health", b"/ready")
        if self._file is not None and probe:
            return
        fields = self._fields(request)
        if self._json:
            stamp, timestamp = self._timestamps.format(request.site.clock.seconds())
            fields = {"time": stamp, "timestamp": timestamp, **fields}
            line = json.dumps(fields)
            if self._file is not None:
                self._file.write_record(line)
                return
            emit = self._log.debug if probe else self._log.info
            emit("{access_json}", access_json=line, access=fields)
            return
        if self._file is not None:
            self._file.write_line(self._line(fields))
            return
        emit = self._log.debug if probe else self._log.info
        emit("{access_line}", access_line=self._line(fields), access=fields)

    def _line(self, fields: dict[str, Any]) -> str:
        # Built here in one go: twisted.logger's own formatting of a dozen
        # fields costs more than the rest of a small request's logging.
        upstream = fields["upstream_seconds"]
        via = f" via {fields['pool']} {fields['worker']}" if "worker" in fields else ""
        mark = "!" if fields["client_disconnected"] else ""
        return (
            f"{fields['client']} - {self._tag} - {{{fields['request_id']}}} "
            f"{fields['total_seconds']:.3f}sec "
            f"(upstream {'-' if upstream is None else f'{upstream:.3f}sec'}{via}) "
            f"{fields['bytes']}B {fields['status']}{mark} "
            f'"{fields["method"]} {fields["target"]} {fields["protocol"]}" '
            f'"{fields["user_agent"] or "-"}"'
        )

    def _fields(self, request: EdgeRequest) -> dict[str, Any]:
        # A client that went away before the response was complete: its
        # status, or nginx's 499 when no response had started, and the mark.
        disconnected = request.is_disconnected
        status = request.code if request.started_writing else 499
        agent = request.headers.first(b"user-agent")
        upstream = request.upstream_seconds
        origin = xmatrix_origin(request.headers.values(b"authorization"))
        fields = {
            "client": request.client_ip,
            "listener": self._tag,
            "request_id": request.request_id,
            "method": request.log_method,
            "target": request.log_target,
            "protocol": request.clientproto.decode("ascii", "backslashreplace"),
            "status": status,
            "client_disconnected": disconnected,
            "bytes": request.sent_length,
            "upstream_seconds": None if upstream is None else round(upstream, 6),
            "total_seconds": round(request.elapsed_seconds(), 6),
            "user_agent": agent.decode("ascii", "backslashreplace") if agent else None,
            "origin": origin.decode("ascii", "backslashreplace") if origin else None,
        }
        worker = request.worker
        if worker is not None:
            fields["pool"], fields["worker"] = worker
        return fields

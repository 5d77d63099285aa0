"""One entry per request: a line in the spirit of Synapse's request log, or
a JSON object for log shippers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from matrix_edge.config.access_log import AccessLogConfig, AccessLogFormat
from matrix_edge.http.accesslog_file import AccessLogFile
from matrix_edge.http.target import decode_query_component
from matrix_edge.pools.keys import xmatrix_origin

if TYPE_CHECKING:
    from matrix_edge.http.site import EdgeRequest

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


class AccessLog:
    """Writes access entries for one listener through twisted.logger.

    Entries go to the ``matrix_edge.access.<tag>`` namespace at INFO, apart
    from ``/health`` and ``/ready`` probes, which are logged at DEBUG so that
    monitoring does not flood the log; or, with ``access_log.path``, to a
    file of their own (without the probes).
    """

    def __init__(
        self, tag: str, config: AccessLogConfig, file: AccessLogFile | None = None
    ):
        self._log = Logger(namespace=f"matrix_edge.access.{tag}")
        self._tag = tag
        self._enabled = config.enabled
        self._json = config.format is AccessLogFormat.JSON
        self._file = file

    def log(self, request: EdgeRequest) -> None:
        if not self._enabled:
            return
        fields = self._fields(request)
        probe = request.path in (b"/health", b"/ready")
        if self._file is not None:
            if not probe:
                self._file.write_line(
                    json.dumps(fields) if self._json else self._line(fields)
                )
            return
        emit = self._log.debug if probe else self._log.info
        if self._json:
            emit("{access_json}", access_json=json.dumps(fields), access=fields)
        else:
            emit("{access_line}", access_line=self._line(fields), access=fields)

    def _line(self, fields: dict[str, Any]) -> str:
        # Built here in one go: twisted.logger's own formatting of a dozen
        # fields costs more than the rest of a small request's logging.
        upstream = fields["upstream_seconds"]
        via = f" via {fields['pool']} {fields['worker']}" if "worker" in fields else ""
        return (
            f"{fields['client']} - {self._tag} - {{{fields['request_id']}}} "
            f"{fields['total_seconds']:.3f}sec "
            f"(upstream {'-' if upstream is None else f'{upstream:.3f}sec'}{via}) "
            f"{fields['bytes']}B {fields['status']} "
            f'"{fields["method"]} {fields["target"]} {fields["protocol"]}" '
            f'"{fields["user_agent"] or "-"}"'
        )

    def _fields(self, request: EdgeRequest) -> dict[str, Any]:
        status = f"{request.code}"
        if request.is_disconnected:
            status = f"{request.code}!" if request.startedWriting else "499!"
        agent = request.getHeader(b"user-agent")
        origin = xmatrix_origin(request.requestHeaders.getRawHeaders(b"authorization"))
        fields = {
            "client": request.client_ip,
            "listener": self._tag,
            "request_id": request.request_id,
            "method": request.log_method,
            "target": request.log_target,
            "protocol": request.clientproto.decode("ascii", "backslashreplace"),
            "status": status,
            "bytes": request.sentLength,
            "upstream_seconds": request.upstream_seconds,
            "total_seconds": round(request.elapsed_seconds(), 6),
            "user_agent": agent.decode("ascii", "backslashreplace") if agent else None,
            "origin": origin.decode("ascii", "backslashreplace") if origin else None,
        }
        worker = request.worker
        if worker is not None:
            fields["pool"], fields["worker"] = worker
        return fields

"""One line per request, in the spirit of Synapse's request log."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from twisted.logger import Logger

if TYPE_CHECKING:
    from matrix_edge.http.site import EdgeRequest

_SECRET_PARAMS = re.compile(rb"(?<=[?&])(access_token|client_secret)=[^&]*")


def redact_target(target: bytes) -> str:
    """The request target for logs: access tokens and client secrets in the
    query replaced by ``<redacted>``."""
    redacted = _SECRET_PARAMS.sub(rb"\1=<redacted>", target)
    return redacted.decode("ascii", "backslashreplace")


class AccessLog:
    """Writes access lines for one listener through twisted.logger.

    Lines go to the ``matrix_edge.access.<tag>`` namespace at INFO, apart
    from ``/health`` probes, which are logged at DEBUG so that monitoring
    does not flood the log.
    """

    def __init__(self, tag: str, enabled: bool):
        self._log = Logger(namespace=f"matrix_edge.access.{tag}")
        self._tag = tag
        self._enabled = enabled

    def log(self, request: EdgeRequest) -> None:
        if not self._enabled:
            return
        code = f"{request.code}" if not request.is_disconnected else f"{request.code}!"
        if request.is_disconnected and not request.startedWriting:
            code = "499!"
        upstream = request.upstream_seconds
        emit = self._log.debug if request.path == b"/health" else self._log.info
        emit(
            "{client} - {tag} - {total:.3f}sec (upstream {upstream}) {sent}B {code} "
            '"{method} {target} {proto}" "{agent}"',
            client=request.client_ip,
            tag=self._tag,
            total=request.elapsed_seconds(),
            upstream="-" if upstream is None else f"{upstream:.3f}sec",
            sent=request.sentLength,
            code=code,
            method=request.log_method,
            target=request.log_target,
            proto=request.clientproto.decode("ascii", "backslashreplace"),
            agent=(request.getHeader(b"user-agent") or b"-").decode(
                "ascii", "backslashreplace"
            ),
        )

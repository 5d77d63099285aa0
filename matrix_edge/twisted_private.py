"""The private parts of Twisted the edge still relies on, in one place;
tests/unit/test_twisted_private.py fails if a Twisted release removes them.

Most belong to twisted.web's HTTP/1.1 server, which the edge uses for client
connections until its own HTTP/1.1 protocol replaces it (the HTTP/2 side
uses none); one is twistd's choice of log observer, which ``log_level``
filters.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel, Request

# HTTPChannel calls this on a request line or headers it cannot parse; the
# edge overrides it to answer a Matrix error instead of a bare 400.
BAD_REQUEST_HOOK = "_respondToBadRequestAndDisconnect"


def request_line(channel: HTTPChannel) -> tuple[bytes, bytes, bytes]:
    """Method, raw target and version of the request being received.

    HTTPChannel sets them on the request only once the whole body is in;
    the edge needs them as soon as the headers are.
    """
    private: Any = channel
    return private._command, private._path, private._version


def is_disconnected(request: Request) -> bool:
    """Whether the request's connection was lost (or, for HTTP/2, its
    stream reset) before it finished."""
    return bool(request._disconnected)


def twistd_default_observer(server_options: Any) -> Any:
    """The log observer twistd builds when no ``--logger`` is given, by
    twistd's own code: stdout, the rotated ``--logfile`` (with its SIGUSR1
    handler) or syslog, and the same refusal of ``--logfile -`` when
    daemonising."""
    from twisted.scripts.twistd import _SomeApplicationRunner

    logger = _SomeApplicationRunner.loggerFactory(server_options)
    return logger._getLogObserver()

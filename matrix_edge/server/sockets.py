"""Socket options for client and upstream connections."""

from __future__ import annotations

import contextlib


def set_no_delay(transport: object) -> None:
    """Turn off Nagle's algorithm on a TCP transport, through any TLS or
    PROXY-protocol wrapper (they pass attribute lookups down); a UNIX
    socket has nothing to turn off.

    Small writes (responses, HTTP/2 window updates) then go out at once;
    with Nagle they can wait for the peer's delayed ACK, 40 ms here."""
    set_option = getattr(transport, "setTcpNoDelay", None)
    if set_option is not None:
        with contextlib.suppress(OSError):
            set_option(True)

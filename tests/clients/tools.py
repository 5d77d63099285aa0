"""Finding (and where needed installing) the HTTP/2 client programs the
corpus tests drive."""

from __future__ import annotations

from tests.e2e import environment

NGHTTP_PACKAGE = "nghttp2-client"


def ensure_nghttp() -> tuple[str | None, str]:
    """The path of ``nghttp``, installing Debian's nghttp2-client when it is
    missing; (None, reason) when it cannot be had."""
    try:
        found = environment.apt_install([NGHTTP_PACKAGE], "nghttp", "/usr/bin/nghttp")
    except environment.Unavailable as e:
        return None, str(e)
    return str(found), ""

"""The ``timeouts`` section, sized for Matrix long-polling."""

from __future__ import annotations

import attrs

from matrix_edge.config._base import KeyPath, fail, parse_duration, read_mapping


@attrs.frozen
class TimeoutsConfig:
    upstream_connect: float = 5.0
    """Opening a connection to Synapse."""

    upstream_response: float = 180.0
    """From the end of the request body to Synapse's response headers. Must
    exceed the longest ``/sync?timeout=`` clients use (30 s is usual) and
    leave room for slow initial syncs."""

    body_idle: float = 60.0
    """A request or response body that moves no byte for this long, in either
    direction, is abandoned: an uploader that stalls, or a reader that stops
    reading."""

    request_body: float = 900.0
    """From the end of a request's headers to the end of its body: a body
    still arriving after this long is abandoned, the client answered 408
    and the connection to Synapse, which saw only part of the body, closed.
    ``body_idle`` ends a body that stops; this ends one that keeps moving
    too slowly for ever (a byte every few seconds), which would otherwise
    hold a Synapse connection and request for as long as it likes. nginx
    has no such total (its ``client_body_timeout`` is between reads, as
    ``body_idle``), so the default is generous: 15 minutes carries a 50 MB
    upload (Synapse's default ``max_upload_size``) at 0.45 Mbit/s, a slow
    mobile uplink. Lower it only with the slowest uploads in mind."""

    client_idle: float = 120.0
    """A client connection with no request in progress is closed after this
    long without traffic."""

    request_headers: float = 30.0
    """From the first byte of a request to the end of its headers. Every
    byte resets ``client_idle``, so without this a client trickling its
    headers (slowloris) would hold a connection for ever."""

    drain: float = 60.0
    """On SIGTERM, how long requests in flight may take to finish before the
    edge exits anyway; long enough for a /sync long-poll (30s)."""


_KEYS = (
    "drain",
    "upstream_connect",
    "upstream_response",
    "body_idle",
    "request_body",
    "client_idle",
    "request_headers",
)


def parse_timeouts(value: object, path: KeyPath) -> TimeoutsConfig:
    data = read_mapping(value, path, _KEYS)
    defaults = TimeoutsConfig()
    values = {}
    for key in _KEYS:
        if key in data:
            seconds = parse_duration(data[key], (*path, key))
            if seconds <= 0:
                fail((*path, key), "must be greater than zero")
            values[key] = seconds
        else:
            values[key] = getattr(defaults, key)
    return TimeoutsConfig(**values)

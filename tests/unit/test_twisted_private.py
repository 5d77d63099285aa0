"""The private names of Twisted that matrix_edge.twisted_private
relies on: if a Twisted release removes or renames one, this fails first,
with the name, rather than the edge misbehaving."""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel, Request

from matrix_edge import twisted_private


def test_bad_request_hook_is_what_httpchannel_calls():
    assert callable(getattr(HTTPChannel, twisted_private.BAD_REQUEST_HOOK))
    called: list[bool] = []

    class Channel(HTTPChannel):
        pass

    setattr(Channel, twisted_private.BAD_REQUEST_HOOK, lambda self: called.append(True))
    channel = Channel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert called == [True]


def test_request_line_is_known_when_the_headers_are():
    seen: list[tuple[bytes, bytes, bytes]] = []

    class Early(Request):
        def gotLength(self, length: int | None) -> None:
            seen.append(twisted_private.request_line(self.channel))
            super().gotLength(length)

    channel = HTTPChannel()
    channel.requestFactory = Early
    channel.makeConnection(StringTransport())
    channel.dataReceived(
        b"PUT /a%2Fb? HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"
    )
    assert seen == [(b"PUT", b"/a%2Fb?", b"HTTP/1.1")]


def test_disconnection_is_visible():
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    request = Request(channel)
    assert not twisted_private.is_disconnected(request)
    request.connectionLost(Exception("gone"))
    assert twisted_private.is_disconnected(request)


def test_twistd_builds_its_default_observer(tmp_path):
    """The observer twistd would use for ``--logfile``, built by its code."""
    observer = twisted_private.twistd_default_observer(
        {"logfile": str(tmp_path / "twistd.log"), "nodaemon": True}
    )
    assert callable(observer)

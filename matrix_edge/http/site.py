"""The per-listener site: which requests are forwarded, which the edge
answers itself, and the request class that streams forwarded bodies."""

from __future__ import annotations

from io import BytesIO
from typing import Any, cast

from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from matrix_edge import twisted_private
from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.listeners import ListenerConfig, ListenerType
from matrix_edge.http import errors
from matrix_edge.http.accesslog import AccessLog, redact_target
from matrix_edge.http.accesslog_file import AccessLogFile
from matrix_edge.http.deadlines import HeaderDeadlines, SlowHeaders
from matrix_edge.http.errors import MatrixError, closing_response, write_error
from matrix_edge.http.forward import Forwarding
from matrix_edge.http.headers import client_address, is_trusted
from matrix_edge.http.request_id import request_id_for
from matrix_edge.http.routing import (
    LOCAL,
    Forward,
    LiveSettings,
    Router,
    admin_allowed,
)
from matrix_edge.http.target import split_target
from matrix_edge.http.transport import (
    ClientSide,
    client_side,
    transport_of,
)
from matrix_edge.http.upstream import Upstream
from matrix_edge.pools.dispatch import Dispatcher
from matrix_edge.resources.health import HealthResource
from matrix_edge.resources.ready import ReadyResource
from matrix_edge.resources.well_known import WellKnownResource
from matrix_edge.server.alpn import NegotiatedProtocol
from matrix_edge.server.h2 import H2ServerProtocol, H2Settings
from matrix_edge.server.h2_channel import H2RequestChannel
from matrix_edge.server.sockets import set_no_delay

# After an early answer, how long the rest of an unwanted upload is read and
# dropped before the connection is closed. Closing at once, with unread data
# in the socket, makes the kernel reset the connection and the client may
# never see the answer.
LINGER_SECONDS = 5.0

# The most request body the edge's own resources (/health, /ready,
# .well-known) read, none of which takes one.
LOCAL_BODY_LIMIT = 64 * 1024

log = Logger()


def local_resources(
    listener: ListenerConfig,
    config: EdgeConfig,
    upstreams: dict[str, Upstream],
    dispatcher: Dispatcher | None = None,
) -> dict[bytes, IResource]:
    """The paths a listener answers itself, by exact raw path."""
    local: dict[bytes, IResource] = {
        b"/health": HealthResource(),
        b"/ready": ReadyResource(
            upstreams,
            dispatcher,
            lambda request: admin_allowed(
                cast(EdgeRequest, request).client_ip, listener
            ),
        ),
    }
    if listener.type is ListenerType.CLIENT:
        documents = {
            b"server": config.well_known.server,
            b"client": config.well_known.client,
            b"support": config.well_known.support,
        }
        for name, body in documents.items():
            if body is not None:
                local[b"/.well-known/matrix/" + name] = WellKnownResource(body)
    return local


class EdgeHTTPChannel(HTTPChannel):
    """HTTP/1.1 channel whose protocol-level rejections are Matrix errors
    too, rather than Twisted's bare ``400 Bad Request``."""

    def connectionMade(self) -> None:
        super().connectionMade()
        set_no_delay(self.transport)

    site: EdgeSite

    def dataReceived(self, data: bytes) -> None:
        if self.line_mode:
            # Request line and headers: they must be complete in time.
            self.site.header_deadlines.start(self)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self.site.header_deadlines.stop(self)
        super().allHeadersReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.header_deadlines.stop(self)
        super().connectionLost(reason)

    def headers_too_slow(self) -> None:
        if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
            return
        log.info(
            "Closing a connection from {peer}: no complete request headers in "
            "{seconds}s",
            peer=self.transport.getPeer(),
            seconds=self.site.config.timeouts.request_headers,
        )
        self._reject(MatrixError(408, "M_UNKNOWN", "Request headers took too long"))

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._reject(errors.bad_request("Malformed HTTP request"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reject(MatrixError(431, "M_UNKNOWN", "Request line or header too long"))

    def _reject(self, error: MatrixError) -> None:
        transport_of(self).write(closing_response(error, self.site.server_header))
        self.loseConnection()


class EdgeRequest(Request):
    """A request that is either forwarded to Synapse, streamed as it
    arrives, or answered by the edge.

    The decision is made in L{gotLength}, once the headers are in and before
    any body byte: forwarded requests open their upstream request there, so
    that neither the request nor the response body is ever held whole.
    """

    site: EdgeSite

    def __init__(self, channel: Any, queued: Any = None):
        # Local resources read no form: a body is never parsed in memory.
        super().__init__(channel, parsePOSTFormSubmission=False)
        self.client_ip = ""
        self.request_id = ""
        self.body_complete = False
        self.head_error: MatrixError | None = None
        """Set before gotLength when the protocol refused the head itself
        (HTTP/2's checks): answered like a refusal by routing."""
        self._local = True
        self._local_body = 0
        self._has_body = False
        self._forwarding: Forwarding | None = None
        self._answer: MatrixError | None = None
        self._response_done = False
        self._started = channel.site.clock.seconds()
        self._linger: Any = None
        self.client_side: ClientSide = client_side(channel)

    # Twisted's hooks ------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        site = self.site = self.channel.site  # type: ignore[attr-defined]
        self.method, self.uri, self.clientproto = self.client_side.request_line()
        self.path = split_target(self.uri)[0]
        self._has_body = length != 0
        headers = self.requestHeaders
        peer = self.getClientAddress().host
        trusted = site.config.trusted_proxies
        self.client_ip = client_address(
            peer, headers.getRawHeaders(b"x-forwarded-for"), trusted
        )
        id_header = self.request_id_header
        self.request_id = request_id_for(
            headers.getRawHeaders(id_header), trusted=is_trusted(peer, trusted)
        )
        self.responseHeaders.setRawHeaders(id_header, [self.request_id.encode()])
        if not headers.hasHeader(b"host") and self.clientproto != b"HTTP/1.1":
            headers.setRawHeaders(b"Host", [site.default_host(self)])

        decision = self.head_error or site.router.route(
            self.method, self.uri, self.path, headers, self.client_ip, length
        )
        if decision is LOCAL:
            if length is None or length <= LOCAL_BODY_LIMIT:
                # Bounded by LOCAL_BODY_LIMIT: memory, never a temporary
                # file (twisted.web's choice for a body of unknown length).
                self.content = BytesIO()
                return
            decision = errors.too_large(LOCAL_BODY_LIMIT)
        self._local = False
        self.content = BytesIO()
        # Synapse's headers go out as they are: no Content-Type of our own.
        self.defaultContentType = None
        if isinstance(decision, Forward):
            self._forwarding = site.forwarding_for(self, decision)
            self._forwarding.start(length, self.client_ip)
        else:
            self._refuse(decision)

    def handleContentChunk(self, data: bytes) -> None:
        if self._local:
            self._local_body += len(data)
            if self._local_body <= LOCAL_BODY_LIMIT:
                super().handleContentChunk(data)
                return
            # A body of unannounced length grew past what a local
            # resource takes: the request is answered and the rest dropped.
            self._local = False
            self.defaultContentType = None
            self.answer_early(errors.too_large(LOCAL_BODY_LIMIT))
        elif self._forwarding is not None and not self._response_done:
            self._forwarding.body_chunk(data)
        # Otherwise the body is unwanted and dropped as it arrives.

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._local:
            super().requestReceived(command, path, version)
            return
        self.body_complete = True
        if self._answer is not None and not self.startedWriting:
            self._write_answer()
        if self._forwarding is not None:
            self._forwarding.body_complete()
        self._maybe_finish()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self._cancel_linger()
        # A request whose headers never all arrived has nothing to log.
        if not self.finished and self.site is not None:
            self.site.access_log.log(self)

    def render(self, resrc: IResource) -> None:
        # A local resource answers: Twisted's process() has just put its own
        # name in the Server header.
        self._name_the_server()
        super().render(resrc)

    # Used by the forwarding ----------------------------------------------

    @property
    def listener(self) -> ListenerConfig:
        return self.site.listener

    @property
    def is_disconnected(self) -> bool:
        return twisted_private.is_disconnected(self)

    @property
    def request_id_header(self) -> bytes:
        return self.site.request_id_header

    @property
    def log_method(self) -> str:
        return self.method.decode("ascii", "backslashreplace")

    @property
    def log_target(self) -> str:
        return redact_target(self.uri)

    @property
    def upstream_seconds(self) -> float | None:
        """Time until Synapse's response headers, for forwarded requests."""
        return self._forwarding.upstream_seconds if self._forwarding else None

    @property
    def worker(self) -> tuple[str, str] | None:
        """The pool and Synapse process a forwarded request went to, when
        the deployment has worker pools."""
        forwarding = self._forwarding
        if forwarding is None or forwarding.upstream is None:
            return None
        pool = forwarding.pool
        if pool is None or (pool == "main" and not self.site.has_workers):
            return None
        return pool, str(forwarding.upstream.address)

    def elapsed_seconds(self) -> float:
        return self.site.clock.seconds() - self._started

    def answer_early(self, error: MatrixError) -> None:
        """Answer with ``error`` instead of Synapse's response.

        When a request body is still arriving, the answer goes out at once
        and the connection closes after it, the rest of the body unread.
        """
        if self.startedWriting:
            # Part of a response is already out: only closing the connection
            # tells the client it is incomplete.
            self.abort()
            return
        self._answer = error
        self.requestHeaders.removeHeader(b"expect")
        self._write_answer_if_due()

    def _refuse(self, error: MatrixError) -> None:
        """Answer ``error`` to a request refused from its headers.

        Called from gotLength, while HTTP/1.1's channel is still in the
        middle of the head, so the answer is written on the next turn of
        the reactor (or by requestReceived, if the request is complete
        first). Removing ``Expect`` now keeps Twisted from inviting a body
        that will not be read.
        """
        self._answer = error
        self.requestHeaders.removeHeader(b"expect")
        self.site.clock.callLater(0, self._write_answer_if_due)

    def _write_answer_if_due(self) -> None:
        if self.startedWriting or self.finished or self.is_disconnected:
            return
        if self.body_complete:
            self._write_answer()
        elif self._has_body:
            self.close_after_response()
            self._write_answer()
        # Otherwise the request is still being parsed: requestReceived,
        # moments from now, writes the answer.

    def close_after_response(self) -> None:
        self.client_side.close_after_response(self)

    def response_complete(self) -> None:
        self._response_done = True
        self._maybe_finish()

    def break_off(self) -> None:
        """End a response that cannot be completed, so that the client sees
        it is incomplete."""
        if not self.is_disconnected:
            framed = self.chunked or self.responseHeaders.hasHeader(b"content-length")
            self.client_side.cut_short(bool(framed))

    def abort(self) -> None:
        """Drop the client connection without completing the response."""
        if not self.is_disconnected:
            self.client_side.abort()

    # Internals --------------------------------------------------------------

    def _write_answer(self) -> None:
        assert self._answer is not None
        self._name_the_server()
        write_error(self, self._answer)
        self._response_done = True
        self._maybe_finish()

    def _name_the_server(self) -> None:
        """Give the edge's own answer the configured Server header, or none.
        Forwarded responses carry Synapse's and never come here."""
        server = self.site.server_header
        if server is None:
            self.responseHeaders.removeHeader(b"server")
        else:
            self.responseHeaders.setRawHeaders(b"Server", [server])

    def _maybe_finish(self) -> None:
        if self.finished or self.is_disconnected or not self._response_done:
            return
        if self.body_complete or not self.client_side.lingers:
            self._cancel_linger()
            self.finish()
        elif self._linger is None:
            self._linger = self.site.clock.callLater(
                LINGER_SECONDS, self._stop_lingering
            )

    def _stop_lingering(self) -> None:
        self._linger = None
        if not self.is_disconnected:
            self.client_side.stop_lingering()

    def _cancel_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


class EdgeSite(Site):
    """The site for one listener."""

    requestFactory = EdgeRequest  # type: ignore[assignment]
    protocol = EdgeHTTPChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        listener: ListenerConfig,
        config: EdgeConfig,
        upstream: Upstream,
        clock: IReactorTime,
        live: LiveSettings | None = None,
        fallback: Upstream | None = None,
        access_log_file: AccessLogFile | None = None,
        dispatcher: Dispatcher | None = None,
    ):
        super().__init__(Resource(), timeout=config.timeouts.client_idle, reactor=clock)
        upstreams = {"synapse": upstream}
        if fallback is not None:
            upstreams["fallback"] = fallback
        self._local = local_resources(listener, config, upstreams, dispatcher)
        self.listener = listener
        self.config = config
        self.request_id_header = config.request_id_header.encode("ascii")
        self.server_header: bytes | None = None
        """The Server header of the edge's own answers."""
        if config.server_header is not None:
            self.server_header = config.server_header.encode("ascii")
        self.upstream = upstream
        self.clock = clock
        self.live = live or LiveSettings(config.maintenance)
        self.has_workers = dispatcher is not None
        self.router = Router(
            listener,
            config,
            self.live,
            upstream,
            fallback,
            frozenset(self._local),
            dispatcher,
        )
        self.access_log = AccessLog(listener.tag, config.access_log, access_log_file)
        self.header_deadlines: HeaderDeadlines[SlowHeaders] = HeaderDeadlines(
            clock,
            config.timeouts.request_headers,
            lambda connection: connection.headers_too_slow(),
        )
        self._h2_settings = H2Settings()

    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:  # type: ignore[override]
        """HTTP/1.1 on a listener without HTTP/2; otherwise the protocol
        that ALPN chose, once TLS has negotiated it."""
        if not self.listener.http2:
            return super().buildProtocol(addr)
        return NegotiatedProtocol(
            lambda: super(EdgeSite, self).buildProtocol(addr),
            self._http2_protocol,
            self.clock,
            self.config.timeouts.client_idle,
        )

    def _http2_protocol(self) -> H2ServerProtocol:
        return H2ServerProtocol(
            lambda stream: H2RequestChannel(stream, self),
            self.clock,
            self._h2_settings,
            self.config.timeouts.client_idle,
            self.config.timeouts.body_idle,
            self.header_deadlines,
        )

    def getResourceFor(self, request: Request) -> IResource:
        # Local resources are found by the raw path, as routing decided;
        # Twisted's tree would match the %xx-decoded one.
        return self._local[request.path]

    def forwarding_for(self, request: EdgeRequest, route: Forward) -> Forwarding:
        return Forwarding(
            request,
            route.placed,
            self.clock,
            self.config.timeouts,
            route.body_limit,
            route.replace,
        )

    def log(self, request: Request) -> None:  # type: ignore[override]
        assert isinstance(request, EdgeRequest)
        self.access_log.log(request)

    def default_host(self, request: EdgeRequest) -> bytes:
        """A Host header for HTTP/1.0 requests sent without one: the address
        the client connected to."""
        host = request.getHost()
        address = getattr(host, "host", "localhost")
        if ":" in address:
            address = f"[{address}]"
        return f"{address}:{getattr(host, 'port', 0)}".encode("ascii")

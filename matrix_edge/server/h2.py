"""The HTTP/2 server side: one client connection, on the h2 library.

h2 parses frames and keeps the protocol's state; this module decides what a
stream is worth to the rest of the edge. Each stream's handler sees one
event for the complete, checked request head, then body data, then the end
(or a reset); it answers through the stream: a head, data, an end.

Flow control carries back-pressure in both directions:

* Request bodies: the edge grants a stream more window only for data its
  handler has passed on, so a client can never have more than one stream
  window of unconsumed body per stream, nor more than one connection window
  in all, buffered here.
* Responses: data waits in the stream's outbox while the client's window is
  closed. Past ``OUTBOX_HIGH`` bytes the handler's producer is paused (the
  upstream connection stops being read) until the outbox drains. When the
  connection's send buffer fills (a client that grants window but does not
  read), the edge stops reading from the client and pauses every stream.

After a GOAWAY, the edge stops reading the connection, and aborts it if
it has not closed within ``CLOSE_GRACE`` seconds (a TLS close waits for the
client's close_notify, which is not read any more).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast
from typing import Protocol as TypingProtocol

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.exceptions
import hyperframe.frame
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from matrix_edge.errors import MatrixError
from matrix_edge.server.connections import ClientConnections
from matrix_edge.server.h2_frames import FrameWatch
from matrix_edge.server.h2_head import Header, RequestHead, parse_request_head
from matrix_edge.server.h2_hpack import StaticEncoder
from matrix_edge.server.sockets import ClientTransport, set_no_delay

log = Logger()

ErrorCodes = h2.errors.ErrorCodes

# A stream's response data buffered while the client's window is closed,
# before the stream's producer is paused; it resumes below OUTBOX_LOW.
OUTBOX_HIGH = 64 * 1024
OUTBOX_LOW = 16 * 1024

# The HPACK table the edge's encoder keeps for responses, whatever larger
# size the client allows: the protocol's default.
ENCODER_TABLE_SIZE = 4096

# A WINDOW_UPDATE smaller than this draws on the abuse budget.
SMALL_WINDOW_UPDATE = 1024

# After the edge's GOAWAY, how long a client may take to close.
CLOSE_GRACE = 2.0


@attrs.frozen
class H2Settings:
    """What the edge allows one HTTP/2 connection."""

    max_concurrent_streams: int = 100
    stream_window: int = 256 * 1024
    """Request body a stream may send ahead of what the upstream took."""

    connection_window: int = 1024 * 1024
    """The same for all of a connection's streams together."""

    max_header_list_size: int = 64 * 1024
    """Decoded size of one header block (RFC 9113 section 6.5.2): bounds
    HPACK decompression and CONTINUATION sequences alike."""

    max_frame_size: int = 16 * 1024

    abuse_budget: float = 1000.0
    """Frames that cost the edge work without being requests draw on this
    budget, refilled at ``abuse_refill`` per second: every control frame a
    little (h2_frames), and a token each for PING, SETTINGS, PRIORITY,
    extension frames, empty DATA, resets and window updates that do nothing,
    tiny window updates to held-back streams, and ``reset_cost`` for a
    client's reset of a stream in progress. A connection that exhausts it
    gets GOAWAY ENHANCE_YOUR_CALM."""

    abuse_refill: float = 200.0
    reset_cost: float = 10.0
    """A reset of a stream the edge is still working on costs this much: a
    request already went upstream for it (rapid reset, CVE-2023-44487)."""


# Queued response data that is sent without waiting for a flush: one DATA
# frame of the default size.
FLUSH_SIZE = 16 * 1024


class StreamHandler(TypingProtocol):
    """What handles one stream's request (see H2Stream for the answer)."""

    def head_received(self, head: RequestHead, ended: bool) -> None:
        """The whole request head, checked; ``ended`` when there is no body."""

    def head_refused(
        self, method: bytes, target: bytes, error: MatrixError, ended: bool
    ) -> None:
        """The head failed its checks (RFC 9113 section 8): answer ``error``
        on the stream. ``method`` and ``target`` are as sent, for the log;
        either may be empty."""

    def data_received(self, data: bytes) -> None: ...

    def ended(self) -> None:
        """The request body is complete."""

    def reset(self, reason: Failure) -> None:
        """The stream is gone before its response ended: reset by the
        client, or the connection closed. Nothing more can be sent."""


class H2Stream:
    """One stream: the response side, handed to the stream's handler."""

    def __init__(self, connection: H2ServerProtocol, stream_id: int):
        self.id = stream_id
        self._connection = connection
        self.handler: StreamHandler | None = None
        self.body_left: int | None = None
        """Declared request body bytes still to come."""
        self.body_done = False
        """The handler was told the request body is complete: at END_STREAM,
        or when the declared length has arrived, whichever is first."""
        self.closed = False
        """No frame may be sent on it any more (ended both ways or reset)."""
        self._head: list[Header] | None = None
        self._head_sent = False
        self._end_pending = False
        self.response_ended = False
        self._outbox: list[bytes] = []
        self._outbox_size = 0
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self._reading_paused = False
        self._unacknowledged = 0
        self.last_progress = 0.0
        """When a frame of the request last arrived, or response data last
        left; see H2ServerProtocol._sweep_stalled."""

    # The response, from the handler ---------------------------------------

    def send_head(self, status: int, headers: list[Header]) -> None:
        """Send the response head (names must be lower case). It goes out
        with the first data or the end, so that an empty response is one
        frame."""
        if self.closed or self._head is not None:
            return
        self._head = [(b":status", b"%d" % status), *headers]

    def send_data(self, data: bytes) -> None:
        """Queue response data. It goes out at L{flush} or L{end}, or once
        a frame's worth is queued, so that one read of Synapse's response
        becomes one write."""
        if self.closed or self._end_pending or not data:
            return
        self._outbox.append(data)
        self._outbox_size += len(data)
        if self._outbox_size >= FLUSH_SIZE:
            self._connection.flush_stream(self)
        if self._outbox_size > OUTBOX_HIGH and self._producer is not None:
            self._pause_producer()

    def flush(self) -> None:
        """Send what is queued, as the windows allow."""
        if not self.closed and self._outbox:
            self._connection.flush_stream(self)

    def end(self) -> None:
        """The response is complete."""
        if self.closed or self._end_pending:
            return
        self._end_pending = True
        self._connection.flush_stream(self)

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abandon the stream: RST_STREAM, nothing more sent or read."""
        if not self.closed:
            self._connection.reset_stream(self, code)

    def register_producer(self, producer: IPushProducer) -> None:
        self._producer = producer
        self._producer_paused = False
        if self._outbox_size > OUTBOX_HIGH or self._connection.send_paused:
            self._pause_producer()

    def unregister_producer(self) -> None:
        self._producer = None

    # Request body flow control, from the handler --------------------------

    def pause_reading(self) -> None:
        """Grant no more window until resumed: the client stops sending
        once what it was already granted is used up."""
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._unacknowledged:
            consumed, self._unacknowledged = self._unacknowledged, 0
            self._connection.acknowledge(self, consumed)

    # Addresses, for the request -------------------------------------------

    def getPeer(self) -> IAddress:
        return self._connection.transport_peer()

    def getHost(self) -> IAddress:
        return self._connection.transport_host()

    # Used by the connection ------------------------------------------------

    def body_consumed(self, size: int) -> int:
        """Account for ``size`` bytes of flow-controlled request data that
        were handed on; returns how much window may be granted now."""
        if self._reading_paused and not self.closed:
            self._unacknowledged += size
            return 0
        return size

    def take_outgoing(
        self, window: int, max_frame: int
    ) -> tuple[list[Header] | None, bytes | None, bool]:
        """What to send now, within ``window``: (head, data, end)."""
        head = None
        if not self._head_sent and self._head is not None:
            head, self._head_sent = self._head, True
        if self._outbox and window > 0:
            first = self._outbox[0]
            size = min(window, max_frame, len(first))
            if size == len(first):
                self._outbox.pop(0)
                data = first
            else:
                data, self._outbox[0] = first[:size], first[size:]
            self._outbox_size -= size
            if self._producer_paused and self._outbox_size < OUTBOX_LOW:
                self._resume_producer()
        else:
            data = None
        end = self._end_pending and not self._outbox and self._head_sent
        return head, data, end

    @property
    def waiting(self) -> bool:
        """Whether the stream has something to send that is held back."""
        return bool(self._outbox) or (self._end_pending and not self.response_ended)

    def pause_for_connection(self) -> None:
        if self._producer is not None:
            self._pause_producer()

    def resume_for_connection(self) -> None:
        if self._producer_paused and self._outbox_size < OUTBOX_LOW:
            self._resume_producer()

    def silence(self) -> None:
        """Send nothing more: the stream is closed for sending."""
        self.closed = True
        self._outbox.clear()
        self._outbox_size = 0
        self._producer = None

    def discard(self) -> int:
        """Forget the stream; returns the request bytes it had not yet
        granted window for."""
        self.silence()
        unacknowledged, self._unacknowledged = self._unacknowledged, 0
        return unacknowledged

    def _pause_producer(self) -> None:
        if not self._producer_paused and self._producer is not None:
            self._producer_paused = True
            self._producer.pauseProducing()

    def _resume_producer(self) -> None:
        if self._producer_paused and self._producer is not None:
            self._producer_paused = False
            self._producer.resumeProducing()


@implementer(IPushProducer)
class H2ServerProtocol(Protocol):
    """One HTTP/2 client connection (after ALPN chose ``h2``)."""

    def __init__(
        self,
        new_handler: Callable[[H2Stream], StreamHandler],
        clock: IReactorTime,
        settings: H2Settings,
        idle_timeout: float,
        stall_timeout: float,
        header_deadline: HeaderDeadline | None = None,
        connections: ClientConnections | None = None,
    ):
        self._new_handler = new_handler
        self._connections = connections
        self._draining = False
        self._clock = clock
        self._settings = settings
        self._idle_timeout = idle_timeout
        self._stall_timeout = stall_timeout
        self._deadline = header_deadline
        self._streams: dict[int, H2Stream] = {}
        self._blocked: dict[int, H2Stream] = {}
        """Streams with data held back by flow control, oldest first."""
        self._conn: h2.connection.H2Connection | None = None
        self._watch = FrameWatch()
        self.send_paused = False
        self._closing = False
        self._idle_timer: IDelayedCall | None = None
        self._stall_timer: IDelayedCall | None = None
        self._last_stream_id = 0
        """The highest stream whose request the edge took."""
        self._frames_sent = 0
        """DATA frames sent, to tell which window updates opened anything."""
        self._close_timer: IDelayedCall | None = None
        self._budget = settings.abuse_budget
        self._budget_at = 0.0
        self._lost = False
        self._flush_call: IDelayedCall | None = None

    # Twisted's protocol -----------------------------------------------------

    def connectionMade(self) -> None:
        settings = self._settings
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = self._conn = h2.connection.H2Connection(config)
        conn.encoder = StaticEncoder()  # type: ignore[assignment]
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Until the client acknowledges the settings, h2 applies its own
        # (equal) default; set it now so no larger block is ever decoded.
        conn.decoder.max_header_list_size = settings.max_header_list_size
        conn.initiate_connection()
        grow = settings.connection_window - 65535
        if grow > 0:
            conn.increment_flow_control_window(grow)
        self._budget_at = self._clock.seconds()
        set_no_delay(self.transport)
        self._transport.registerProducer(self, True)
        if self._deadline is not None:
            # The connection preface must arrive in time, like headers.
            self._deadline.start(self)
        self._arm_idle()
        self._flush()
        if self._connections is not None:
            self._connections.add(self)

    def retire(self) -> None:
        """A reload replaced the listener's configuration: as for a stop,
        GOAWAY tells the client which streams were taken, and it opens a
        new connection for the rest; nothing is cut."""
        self.drain()

    def drain(self) -> None:
        """The edge is stopping: GOAWAY names the last stream taken, streams
        the client opens after it are refused, and the connection closes
        once the streams in progress are answered.

        The GOAWAY is written past h2, which would otherwise close its
        state machine and end the streams still being answered."""
        if self._draining or self._closing:
            return
        self._draining = True
        if not self._streams:
            self.close(ErrorCodes.NO_ERROR)
            return
        self._flush()
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self._last_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        if self.transport is not None and not self._lost:
            self.transport.write(frame.serialize())

    def abort(self) -> None:
        """Close now (the drain time is up)."""
        if self.transport is not None and not self._lost:
            self._transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        conn = self._conn
        assert conn is not None
        watch = self._watch
        in_header_block = watch.feed(data)
        if watch.violation is not None:
            self.close(ErrorCodes(watch.violation))
            return
        if watch.control_cost:
            # Each control frame costs a little: enough to end floods of
            # frames h2 takes in without a word (resets and window updates
            # for closed streams), not legitimate traffic.
            self._spend(watch.control_cost)
            watch.control_cost = 0.0
            if self._closing:
                return
        if self._deadline is not None:
            if in_header_block:
                self._deadline.start(self)
            else:
                self._deadline.stop(self)
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._connection_error(e)
            return
        for event in events:
            self._dispatch(event)
            if self._closing:
                return
        self._flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._connections is not None:
            self._connections.remove(self)
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._closing = True
        for timer in (self._idle_timer, self._stall_timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._deadline is not None:
            self._deadline.stop(self)
        streams, self._streams = self._streams, {}
        self._blocked.clear()
        for stream in streams.values():
            self._stream_gone(stream, reason)

    # IPushProducer: the transport's send buffer -----------------------------

    def pauseProducing(self) -> None:
        """The client is not reading: stop reading it, and stop the streams'
        producers, until it does."""
        if self.send_paused:
            return
        self.send_paused = True
        if self.transport is not None and not self._closing:
            self._transport.pauseProducing()
        for stream in self._streams.values():
            stream.pause_for_connection()

    def resumeProducing(self) -> None:
        if not self.send_paused:
            return
        self.send_paused = False
        if self.transport is not None and not self._closing:
            self._transport.resumeProducing()
        self._flush_blocked()
        for stream in list(self._streams.values()):
            stream.resume_for_connection()

    def stopProducing(self) -> None:
        pass

    @property
    def _transport(self) -> ClientTransport:
        return cast(ClientTransport, self.transport)

    # Used by streams ----------------------------------------------------------

    def transport_peer(self) -> IAddress:
        assert self.transport is not None
        return self.transport.getPeer()

    def transport_host(self) -> IAddress:
        assert self.transport is not None
        return self.transport.getHost()

    def flush_stream(self, stream: H2Stream) -> None:
        """Send what ``stream`` has that its windows allow."""
        conn = self._conn
        if conn is None or stream.closed or self._closing:
            return
        if self.send_paused:
            if stream.waiting:
                self._blocked[stream.id] = stream
            return
        try:
            self._send_outgoing(conn, stream)
        except h2.exceptions.ProtocolError:
            # h2 has already taken in frames whose events are still to be
            # handled: the client reset this stream, or sent GOAWAY. Those
            # events, handled next, tell the handler (and charge the reset);
            # nothing more can go out on it.
            stream.silence()
        if stream.waiting and not stream.closed:
            self._blocked[stream.id] = stream
        else:
            self._blocked.pop(stream.id, None)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Write what the streams made at the end of this turn of the
        reactor: responses to several streams that Synapse's connections
        delivered in one turn go out as one TLS record and one send()."""
        if self._flush_call is None and not self._lost:
            self._flush_call = self._clock.callLater(0, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_call = None
        self._flush()

    def _send_outgoing(
        self, conn: h2.connection.H2Connection, stream: H2Stream
    ) -> None:
        while True:
            window = conn.local_flow_control_window(stream.id)
            head, data, end = stream.take_outgoing(window, conn.max_outbound_frame_size)
            if head is not None:
                conn.send_headers(stream.id, head, end_stream=end and data is None)
                if end and data is None:
                    self._response_ended(stream)
                    return
            if data is not None:
                conn.send_data(stream.id, data, end_stream=end)
                self._frames_sent += 1
                if end:
                    self._response_ended(stream)
                    return
                continue
            if end:
                conn.end_stream(stream.id)
                self._response_ended(stream)
            return

    def acknowledge(self, stream: H2Stream, size: int) -> None:
        """Grant window for ``size`` request bytes the stream passed on."""
        conn = self._conn
        if conn is None or self._closing or size <= 0:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.acknowledge_received_data(size, stream.id)
        self._flush()

    def reset_stream(self, stream: H2Stream, code: ErrorCodes) -> None:
        """Reset ``stream`` with RST_STREAM; a request still in progress on
        it learns that its stream is gone, as from a client's reset."""
        conn = self._conn
        self._forget(stream)
        if conn is not None and not self._closing:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn.reset_stream(stream.id, code)
            self._flush()
        self._stream_gone(stream, Failure(StreamResetByEdge(code)))

    def headers_too_slow(self) -> None:
        """The header deadline passed with a header block (or the preface)
        still incomplete."""
        log.info(
            "Closing an HTTP/2 connection from {peer}: headers incomplete after "
            "the header deadline",
            peer=self.transport.getPeer() if self.transport else "-",
        )
        self.close(ErrorCodes.NO_ERROR)

    def close(self, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY and close; streams in progress are reset."""
        if self._closing:
            return
        conn = self._conn
        if conn is not None:
            # RFC 9113 section 6.8: streams above this one were not acted
            # on, and a client may retry them on another connection.
            conn.close_connection(error_code=code, last_stream_id=self._last_stream_id)
            self._flush()
        self._shut_down(Failure(ConnectionAbandoned(code)))

    # Events -------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._stream_ended(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            if self._blocked and (event.delta or 0) < SMALL_WINDOW_UPDATE:
                # Tiny increments to held-back streams make the edge send
                # tiny DATA frames, a flush each.
                self._spend(1.0)
            self._window_updated(event.stream_id)
        elif isinstance(event, h2.events.UnknownFrameReceived):
            # Extension frames (PRIORITY_UPDATE among them) are ignored,
            # but not for free.
            self._spend(1.0)
        elif isinstance(event, h2.events.StreamReset):
            self._stream_reset(event)
        elif isinstance(event, (h2.events.PingReceived, h2.events.PriorityUpdated)):
            self._spend(1.0)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._spend(1.0)
            changed = event.changed_settings
            if h2.settings.SettingCodes.HEADER_TABLE_SIZE in changed:
                # RFC 7541 section 4.2: the encoder may keep a smaller table
                # than the client allows (up to 4 GiB); h2 would take all.
                encoder = self._conn.encoder if self._conn else None
                if (
                    encoder is not None
                    and encoder.header_table_size > ENCODER_TABLE_SIZE
                ):
                    encoder.header_table_size = ENCODER_TABLE_SIZE
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                self._flush_blocked()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client's GOAWAY: it opens no more streams, and has given
            # up on those it does not list; nothing more is sent either.
            self._shut_down(Failure(ConnectionAbandoned(event.error_code or 0)))
        # TrailersReceived: trailers are not forwarded; the StreamEnded that
        # comes with them ends the request. Anything else needs no action.

    def _request(self, event: h2.events.RequestReceived) -> None:
        if self._draining:
            # After the GOAWAY: not acted on, and the client may retry it
            # on another connection.
            conn = self._conn
            assert conn is not None
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            self._flush()
            return
        self._cancel_idle()
        stream_id = self._last_stream_id = event.stream_id
        ended = event.stream_ended is not None
        stream = H2Stream(self, stream_id)
        stream.body_done = ended
        stream.last_progress = self._clock.seconds()
        self._streams[stream_id] = stream
        if self._stall_timer is None:
            self._stall_timer = self._clock.callLater(
                self._stall_timeout / 2, self._sweep_stalled
            )
        block = event.headers or ()
        head = parse_request_head(block, ended)
        handler = stream.handler = self._new_handler(stream)
        if isinstance(head, MatrixError):
            pseudo = {name: value for name, value in block if name[:1] == b":"}
            self._guarded(
                stream,
                handler.head_refused,
                pseudo.get(b":method", b""),
                pseudo.get(b":path", b""),
                head,
                ended,
            )
            return
        stream.body_left = head.content_length
        self._guarded(stream, handler.head_received, head, ended)

    def _data(self, event: h2.events.DataReceived) -> None:
        conn = self._conn
        assert conn is not None
        if not event.data and event.stream_ended is None:
            # An empty DATA frame that does not even end its stream.
            self._spend(1.0)
            if self._closing:
                return
        size = event.flow_controlled_length or 0
        stream = self._streams.get(event.stream_id)
        handler = stream.handler if stream is not None else None
        if stream is None or handler is None or stream.closed:
            # Unwanted data still counts against the windows.
            if size:
                conn.acknowledge_received_data(size, event.stream_id)
            return
        data = event.data
        stream.last_progress = self._clock.seconds()
        if data:
            self._guarded(stream, handler.data_received, data)
        grant = stream.body_consumed(size)
        if grant:
            conn.acknowledge_received_data(grant, event.stream_id)
        if stream.body_left is not None and data:
            # h2 refuses more than the declared length, so the body is
            # complete once that much has come, END_STREAM or not.
            stream.body_left -= len(data)
            if not stream.body_left:
                self._body_done(stream)

    def _body_done(self, stream: H2Stream) -> None:
        if not stream.body_done:
            stream.body_done = True
            if stream.handler is not None and not stream.closed:
                self._guarded(stream, stream.handler.ended)

    def _stream_ended(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.body_left:
            # Trailers ended the stream short of its Content-Length (h2
            # checks the length only when DATA carries END_STREAM): a
            # malformed request (RFC 9113 section 8.1.1), and the upstream
            # must not take what it got for the whole body.
            self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)
            return
        self._body_done(stream)
        if stream.response_ended:
            self._forget(stream)

    def _stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            self._spend(1.0)  # nothing to reset
            return
        if event.remote_reset and not stream.response_ended:
            self._spend(self._settings.reset_cost)
        self._forget(stream)
        self._stream_gone(stream, Failure(StreamResetByClient(event.error_code or 0)))

    def _window_updated(self, stream_id: int) -> None:
        if stream_id == 0:
            if self._blocked:
                sent = self._frames_sent
                self._flush_blocked()
                if self._frames_sent == sent:
                    # Every held-back stream waits on its own window: the
                    # update bought a pass over them all, and nothing else.
                    self._spend(1.0)
        elif stream_id not in self._streams:
            self._spend(1.0)  # a stream long closed, or never opened
        else:
            stream = self._blocked.get(stream_id)
            if stream is not None:
                self.flush_stream(stream)

    # Internals ----------------------------------------------------------------

    def _response_ended(self, stream: H2Stream) -> None:
        stream.response_ended = True
        self._blocked.pop(stream.id, None)
        if stream.body_done:
            # Its END_STREAM, if still to come, finds nothing to do.
            self._forget(stream)
        else:
            # RFC 9113 section 8.1: the answer does not need the rest of
            # the request, so the client may stop sending it.
            self.reset_stream(stream, ErrorCodes.NO_ERROR)

    def _forget(self, stream: H2Stream) -> None:
        unacknowledged = stream.discard()
        if unacknowledged and self._conn is not None and not self._closing:
            # Data the stream held back still counts against the
            # connection's window: give it back, or later streams starve.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._conn.acknowledge_received_data(unacknowledged, stream.id)
        self._blocked.pop(stream.id, None)
        if self._streams.pop(stream.id, None) is not None and not self._streams:
            if self._draining:
                self._clock.callLater(0, self.close, ErrorCodes.NO_ERROR)
            else:
                self._arm_idle()

    def _stream_gone(self, stream: H2Stream, reason: Failure) -> None:
        handler, stream.handler = stream.handler, None
        stream.silence()
        if handler is not None and not stream.response_ended:
            try:
                handler.reset(reason)
            except Exception:
                log.failure("Error while resetting HTTP/2 stream {id}", id=stream.id)

    def _guarded(self, stream: H2Stream, call: Callable[..., None], *args: Any) -> None:
        """Run a handler's callback; a failure there resets its stream
        rather than the whole connection."""
        try:
            call(*args)
        except Exception:
            log.failure("Error handling HTTP/2 stream {id}", id=stream.id)
            if not stream.closed:
                self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self.send_paused or self._closing:
                return
            self.flush_stream(stream)

    def _spend(self, cost: float) -> None:
        now = self._clock.seconds()
        settings = self._settings
        self._budget = min(
            settings.abuse_budget,
            self._budget + (now - self._budget_at) * settings.abuse_refill,
        )
        self._budget_at = now
        self._budget -= cost
        if self._budget < 0:
            log.warn(
                "Closing an HTTP/2 connection from {peer}: too many control "
                "frames or stream resets",
                peer=self.transport.getPeer() if self.transport else "-",
            )
            self.close(ErrorCodes.ENHANCE_YOUR_CALM)

    def _connection_error(self, error: h2.exceptions.ProtocolError) -> None:
        """h2 refused the client's input and has queued its GOAWAY."""
        queued = getattr(error, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
        code = queued
        cause = error.__cause__
        if isinstance(cause, hpack.exceptions.HPACKError) and not isinstance(
            cause, hpack.exceptions.OversizedHeaderListError
        ):
            # RFC 9113 section 4.3: a header block that cannot be decoded
            # is a COMPRESSION_ERROR; h2 says PROTOCOL_ERROR.
            code = ErrorCodes.COMPRESSION_ERROR
        log.info(
            "HTTP/2 protocol error from {peer}: {error}",
            peer=self.transport.getPeer() if self.transport else "-",
            error=str(error) or type(error).__name__,
        )
        conn = self._conn
        assert conn is not None
        # h2's own GOAWAY names the highest stream it saw, though the events
        # of the read that failed (requests among them) never reached the
        # edge; and its code can be wrong (above). The edge's names the
        # highest stream it took, so the client knows what to retry.
        conn.data_to_send()
        conn.close_connection(error_code=code, last_stream_id=self._last_stream_id)
        self._flush()
        self._shut_down(Failure(ConnectionAbandoned(code)))

    def _shut_down(self, reason: Failure) -> None:
        """Take no more input, reset what is in progress and close, with a
        bounded wait for the client's side of the close."""
        self._closing = True
        if self._deadline is not None:
            self._deadline.stop(self)
        self._cancel_idle()
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None
        streams, self._streams = self._streams, {}
        self._blocked.clear()
        for stream in streams.values():
            self._stream_gone(stream, reason)
        transport = self.transport
        if transport is None or self._lost:
            return
        self._transport.unregisterProducer()
        # Nothing the client sends now is wanted: stop reading it at all.
        self._transport.pauseProducing()
        transport.loseConnection()
        self._close_timer = self._clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._close_timer = None
        if self.transport is not None and not self._lost:
            self._transport.abortConnection()

    def _flush(self) -> None:
        conn = self._conn
        if conn is None or self.transport is None or self._lost:
            return
        data = conn.data_to_send()
        if data:
            self.transport.write(data)

    def _arm_idle(self) -> None:
        if self._idle_timer is None and not self._closing:
            self._idle_timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            if self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None

    def _sweep_stalled(self) -> None:
        """Reset streams that made no progress for ``stall_timeout``: a
        request body that stopped coming (to a local resource, which has no
        timer of its own), a response the client never opens its window
        for, or never reads. Waiting for Synapse's answer is not a stall."""
        self._stall_timer = None
        if self._closing:
            return
        limit = self._clock.seconds() - self._stall_timeout
        for stream in list(self._streams.values()):
            if stream.last_progress <= limit and (
                stream.waiting or not stream.body_done
            ):
                log.info(
                    "Resetting HTTP/2 stream {id} from {peer}: no progress in {seconds}s",
                    id=stream.id,
                    peer=self._transport.getPeer(),
                    seconds=self._stall_timeout,
                )
                self.reset_stream(stream, ErrorCodes.CANCEL)
        if self._streams and not self._closing:
            self._stall_timer = self._clock.callLater(
                self._stall_timeout / 2, self._sweep_stalled
            )

    def _idle(self) -> None:
        self._idle_timer = None
        if not self._streams:
            self.close(ErrorCodes.NO_ERROR)


class HeaderDeadline(TypingProtocol):
    """Bounds the time a connection may take over a header block."""

    def start(self, connection: H2ServerProtocol) -> None: ...
    def stop(self, connection: H2ServerProtocol) -> None: ...


class ConnectionAbandoned(Exception):
    """The HTTP/2 connection was closed with GOAWAY (by either side)."""

    def __init__(self, code: int):
        super().__init__(f"HTTP/2 connection closed ({_code_name(code)})")
        self.code = code


class StreamResetByEdge(Exception):
    """The edge reset the stream (an upstream that broke off, a stalled
    body, a malformed request)."""

    def __init__(self, code: int):
        super().__init__(f"stream reset by the edge ({_code_name(code)})")
        self.code = code


class StreamResetByClient(Exception):
    """The client reset the stream with RST_STREAM."""

    def __init__(self, code: int):
        super().__init__(f"stream reset by the client ({_code_name(code)})")
        self.code = code


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"

"""Where a client is in its HTTP/2 byte stream: inside a header block or not.

h2 holds a header block back until its last CONTINUATION frame, so the
protocol cannot see one arrive slowly. This reads just the 9-byte frame
headers as the bytes go by, so that the header deadline can cover the
connection preface and every header block, as it covers HTTP/1.1 heads.
On the way it counts control frames, which cost the edge work whether or
not h2 reports them (h2 silently drops resets and window updates for
closed streams), and catches the one frame-size error h2 reports with the
wrong code: a SETTINGS acknowledgement with a payload (RFC 9113 section
6.5).
"""

from __future__ import annotations

PREFACE_LENGTH = 24
_FRAME_HEADER = 9
_DATA = 0x0
_HEADERS = 0x1
_PUSH_PROMISE = 0x5
_SETTINGS = 0x4
_CONTINUATION = 0x9
_END_HEADERS = 0x4
_ACK = 0x1
FRAME_SIZE_ERROR = 0x6
_WINDOW_UPDATE = 0x8

# What a control frame draws on the connection's abuse budget, whatever h2
# makes of it. Window updates are the cheapest: some clients send one for
# every DATA frame they read.
CONTROL_FRAME_COST = {_WINDOW_UPDATE: 0.01}


class FrameWatch:
    """Follows frame boundaries; :meth:`feed` says whether the client is in
    the middle of the preface or of a header block."""

    def __init__(self) -> None:
        self._preface_left = PREFACE_LENGTH
        self._partial = b""
        """The start of a frame header split across reads."""
        self._payload_left = 0
        self._in_block = False
        """A HEADERS frame without END_HEADERS was seen, and no CONTINUATION
        with it since."""
        self._block_ends = False
        """The frame being read ends the header block it belongs to."""
        self.control_cost = 0.0
        """What the frames other than DATA and header blocks seen so far
        cost, by CONTROL_FRAME_COST."""
        self.violation: int | None = None
        """An HTTP/2 error code, once a frame that must close the
        connection went by."""

    def feed(self, data: bytes) -> bool:
        position = 0
        size = len(data)
        if self._preface_left:
            taken = min(self._preface_left, size)
            self._preface_left -= taken
            position = taken
            if self._preface_left:
                return True
        while position < size:
            if self._payload_left:
                taken = min(self._payload_left, size - position)
                self._payload_left -= taken
                position += taken
                if not self._payload_left and self._block_ends:
                    self._in_block = self._block_ends = False
                continue
            need = _FRAME_HEADER - len(self._partial)
            header = self._partial + data[position : position + need]
            position += len(header) - len(self._partial)
            if len(header) < _FRAME_HEADER:
                self._partial = header
                return self._in_block
            self._partial = b""
            self._frame(header)
        return self._in_block

    def _frame(self, header: bytes) -> None:
        length = int.from_bytes(header[:3], "big")
        kind, flags = header[3], header[4]
        if kind == _SETTINGS and flags & _ACK and length:
            self.violation = FRAME_SIZE_ERROR
        if kind in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
            self._in_block = True
            self._block_ends = bool(flags & _END_HEADERS)
        elif kind != _DATA:
            self.control_cost += CONTROL_FRAME_COST.get(kind, 0.1)
        self._payload_left = length
        if not length and self._block_ends:
            self._in_block = self._block_ends = False

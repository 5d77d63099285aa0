"""The private names of Twisted that matrix_edge.twisted_private
relies on: if a Twisted release removes or renames one, this fails first,
with the name, rather than the edge misbehaving."""

from __future__ import annotations

from matrix_edge import twisted_private


def test_twistd_builds_its_default_observer(tmp_path):
    """The observer twistd would use for ``--logfile``, built by its code."""
    observer = twisted_private.twistd_default_observer(
        {"logfile": str(tmp_path / "twistd.log"), "nodaemon": True}
    )
    assert callable(observer)


def test_tcp_connections_keep_the_send_buffer_write_eagerly_reads():
    """write_eagerly reads these attributes of Twisted's TCP connection."""
    import socket

    from twisted.internet import tcp

    from matrix_edge.twisted_private import write_eagerly

    class Shell(tcp.Connection):
        def __init__(self, sock: socket.socket) -> None:
            super().__init__(sock, protocol=None)
            self.connected = 1

    left, right = socket.socketpair()
    try:
        connection = Shell(left)
        for name in ("_tempDataBuffer", "offset", "dataBuffer", "disconnecting"):
            assert hasattr(connection, name), name
        write_eagerly(connection)
        connection.write(b"sent at once")
        assert right.recv(100) == b"sent at once"
        connection.writeSequence([b"a", b"b"])
        assert right.recv(100) == b"ab"
    finally:
        left.close()
        right.close()


def test_the_reactor_records_the_signal_that_stopped_it():
    """exit_cleanly clears what twistd re-raises at exit."""
    from twisted.internet import reactor

    from matrix_edge.twisted_private import exit_cleanly

    assert hasattr(reactor, "_exitSignal")
    from twisted.application import app

    assert hasattr(app, "_exitWithSignal")

    class Stopped:
        _exitSignal = 15

    stopped = Stopped()
    exit_cleanly(stopped)
    assert stopped._exitSignal is None

"""Paths that a normalising server downstream would read as another one
(report item 5). README: the edge refuses "raw or encoded dot segments",
and "/_synapse/admin stays closed"; every answer of its own is a Matrix
JSON error. Nothing of these may reach Synapse, nor the listener's
fallback web server (which may decode and merge what the edge does not)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.adversarial.conftest import ScriptedUpstream
from tests.adversarial.wire import Conn
from tests.http1_messages import get

DISGUISED = [
    # Dot segments closed by an encoded slash, below the forwarded prefixes.
    b"/_matrix/..%2f_synapse/admin/v1/server_version",
    b"/_matrix/client/..%2F..%2F_synapse/admin/v1/users",
    b"/_matrix/%2e%2e%2f_synapse/admin/v1/server_version",
    b"/_matrix/client/%2E%2E%2F%2e%2e%2f_synapse/admin/v1/users",
    b"/_synapse/client/..%2f..%2f_synapse/admin/v1/users",
    b"/_synapse/client/%2e%2e%2f%2e%2e%2f_synapse/admin/v1/users",
    # /_synapse/admin spelt so that a prefix match misses it.
    b"//_synapse/admin/v1/server_version",
    b"/%5fsynapse/admin/v1/server_version",
    b"/%5Fsynapse/admin/v1/server_version",
    b"/_synapse%2fadmin/v1/server_version",
    b"/_synapse%2Fadmin/v1/server_version",
    # Already refused: raw and encoded dot segments between real slashes.
    b"/_matrix/../_synapse/admin/v1/server_version",
    b"/_matrix/%2e%2e/_synapse/admin/v1/server_version",
    b"/_synapse/client/.%2E/_synapse/admin/v1/users",
    b"/_synapse/admin/v1/server_version",
]


async def _ask(port: int, target: bytes):
    def run():
        with Conn(port) as conn:
            conn.send(get(target))
            return conn.response()

    return await deferToThread(run)


@pytest.mark.parametrize("target", DISGUISED)
@pytest_twisted.ensureDeferred
async def test_disguised_admin_paths_are_refused(edge, tracebacks, target):
    fallback = ScriptedUpstream()
    stack = edge(fallback=fallback)
    answer = await _ask(stack.port, target)
    await deferLater(reactor, 0.1, lambda: None)
    assert stack.upstream.requests == [], "forwarded to Synapse"
    assert fallback.requests == [], "handed to the fallback web server"
    assert answer.status in (400, 403, 404), answer
    assert answer.header(b"content-type") == b"application/json"
    assert {"errcode", "error"} <= set(answer.json())
    assert tracebacks == []


@pytest_twisted.ensureDeferred
async def test_the_fallback_web_server_is_reached(edge):
    """The setting the test above relies on: paths outside Matrix do go to
    the fallback web server, as they are."""
    fallback = ScriptedUpstream()
    stack = edge(fallback=fallback)
    answer = await _ask(stack.port, b"/index.html?a=%2F")
    assert answer.status == 200
    assert [r.target for r in fallback.requests] == [b"/index.html?a=%2F"]
    assert stack.upstream.requests == []

"""The suite has teeth: behind a proxy that %xx-decodes request paths,
federation must fail at Synapse's signature check.

hs3.test is a fresh homeserver whose matrix-edge forwards to a decoding shim
(decoding_shim.py, the kind of damage nginx does with ``proxy_pass
http://synapse/;``) instead of to Synapse directly. The same operations that
pass between hs1 and hs2 in test_e2e_federation.py are tried between hs1 and
hs3, and must break: Synapse on hs3 rebuilds the signed request target from
the bytes it receives, which no longer match what hs1 signed.

Only hs3 is behind the shim, and hs1's backoff after these failures concerns
hs3 alone, so the main scenario is unaffected whatever the test order.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.clients import ClientError, Clients
from tests.e2e.homeserver import Homeserver
from tests.e2e.topology import User, Users

pytestmark = pytest.mark.e2e

SIGNATURE_FAILURE = re.compile(
    r"Invalid signature|BadSignatureError|Unable to verify signature", re.I
)


def assert_signature_failure(
    hs3: Homeserver, error: ClientError, endpoint: str
) -> None:
    """hs1 relayed hs3's refusal to the client, the request went through the
    shim and was decoded there, and hs3's Synapse logged why it refused."""
    assert error.errcode == "M_UNAUTHORIZED", error.answer
    assert SIGNATURE_FAILURE.search(error.answer["message"]), error.answer

    rewrites = [
        line.split(" -> ")
        for line in hs3.shim_log_path.read_text().splitlines()
        if endpoint in line
    ]
    assert rewrites, f"no {endpoint} request reached the decoding shim"
    assert any("%21" in old and "%21" not in new for old, new in rewrites), rewrites

    assert hs3.synapse is not None
    log = hs3.synapse.log_path.read_text(errors="replace")
    refusals = [
        line
        for line in log.splitlines()
        if endpoint in line and SIGNATURE_FAILURE.search(line)
    ]
    assert refusals, f"hs3's Synapse logged no signature failure for {endpoint}"


@pytest.fixture(scope="module")
def carol_room(carol: User, clients: Clients) -> dict:
    room_id = clients.call(
        "create_room", name="carol", alias_localpart="canon-e2e", public=True
    )["room_id"]
    return {"room_id": room_id, "alias": "#canon-e2e:hs3.test"}


def test_join_fails_at_the_signature_check(
    hs3: Homeserver, users: Users, clients: Clients, carol_room: dict
) -> None:
    """Alice (hs1) joins Carol's room on hs3 by alias. The directory query
    carries the alias in its query string and gets through; make_join has
    the room and user IDs escaped in its path, and is rejected."""
    resolved = clients.call("resolve_alias", name="alice", alias=carol_room["alias"])
    assert resolved["room_id"] == carol_room["room_id"]

    with pytest.raises(ClientError) as failure:
        clients.call("join", name="alice", room=carol_room["alias"])
    assert_signature_failure(hs3, failure.value, "/make_join/")


def test_invite_fails_at_the_signature_check(
    hs3: Homeserver, users: Users, carol: User, clients: Clients
) -> None:
    """Alice (hs1) invites Carol (hs3): the invite's path carries the room
    and event IDs escaped."""
    room_id = clients.call("create_room", name="alice")["room_id"]
    with pytest.raises(ClientError) as failure:
        clients.call("invite", name="alice", room_id=room_id, user_id=carol.user_id)
    assert_signature_failure(hs3, failure.value, "/invite/")


def test_escaped_client_paths_break_too(carol: User, clients: Clients) -> None:
    """An alias with a slash, escaped as %2F by the client, is a different
    path once decoded: Synapse no longer finds the endpoint."""
    room_id = clients.call("create_room", name="carol")["room_id"]
    answer = clients.try_call(
        "put_alias", name="carol", alias="#canon/slash:hs3.test", room_id=room_id
    )
    assert not answer["ok"]
    assert answer["status"] == 404, answer

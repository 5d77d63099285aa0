"""Two federating Synapse homeservers, each behind its own matrix-edge, used
by real Matrix clients through the edges only.

Federation finds each edge's federation port the way real deployments do:
Synapse fetches ``https://hsN.test/.well-known/matrix/server`` from the
edge's client port and connects to the ``hsN.test:8448`` it names, checking
the certificate against the suite's CA.

Room aliases and state keys are chosen so that every request carrying them
has %xx escapes (%2F, %23, %3F, %2B, %25, ...) in its path: a proxy that
changed those bytes would break the client requests (404) and the signed
federation requests (401).
"""

from __future__ import annotations

import http.client
import json
import ssl
import time

import pytest

from tests.e2e.clients import Clients
from tests.e2e.processes import wait_for
from tests.e2e.topology import SOURCE_IPS, Cluster, Users

pytestmark = pytest.mark.e2e

ROOM_ALIAS_LOCALPART = "e2e/room?x=#1&y+é"
BOB_ALIAS_LOCALPART = "bob's/room%2F+#é"
EXTRA_ALIAS = "#e2e/extra+alias%25?:hs1.test"
STATE_TYPE = "org.matrix_edge.e2e"
STATE_KEY = "a/b c?d#e%2Ff+g:@h!$é"
MEDIA_SIZE = 24 * 1024 * 1024
SPOOFED_ADDRESS = "203.0.113.7"


@pytest.fixture(scope="module")
def alice_room(users: Users, clients: Clients) -> dict:
    """A room on hs1 with an alias and a state key that need escaping."""
    room_id = clients.call(
        "create_room", name="alice", alias_localpart=ROOM_ALIAS_LOCALPART
    )["room_id"]
    clients.call(
        "put_state",
        name="alice",
        room_id=room_id,
        event_type=STATE_TYPE,
        state_key=STATE_KEY,
        content={"note": "escaped state key", "room": "alice"},
    )
    # A second alias, set with its own request (PUT /directory/room/...).
    clients.call("put_alias", name="alice", alias=EXTRA_ALIAS, room_id=room_id)
    return {
        "room_id": room_id,
        "alias": f"#{ROOM_ALIAS_LOCALPART}:hs1.test",
    }


@pytest.fixture(scope="module")
def bob_room(users: Users, clients: Clients) -> dict:
    """A public room on hs2 with an alias that needs escaping."""
    room_id = clients.call(
        "create_room", name="bob", alias_localpart=BOB_ALIAS_LOCALPART, public=True
    )["room_id"]
    return {"room_id": room_id, "alias": f"#{BOB_ALIAS_LOCALPART}:hs2.test"}


@pytest.fixture(scope="module")
def shared_room(users: Users, clients: Clients, alice_room: dict) -> str:
    """Alice's room once Bob, on the other server, has been invited and has
    joined: an invite from hs1 to hs2 and a join from hs2 to hs1."""
    room_id = alice_room["room_id"]
    clients.call("invite", name="alice", room_id=room_id, user_id=users.bob.user_id)
    clients.call("wait_for_invite", name="bob", room_id=room_id, within=60)
    assert clients.call("join", name="bob", room=room_id)["room_id"] == room_id
    wait_for(
        "alice's server to see bob joined",
        lambda: (
            users.bob.user_id
            in clients.call("members", name="alice", room_id=room_id)["user_ids"]
            or None
        ),
        60,
    )
    return room_id


def test_well_known_server_is_served_by_the_edge(cluster: Cluster) -> None:
    """What Synapse fetches to find the federation port."""
    for server in (cluster.hs1, cluster.hs2):
        for path, expected in (
            ("server", {"m.server": f"{server.server_name}:8448"}),
            ("client", {"m.homeserver": {"base_url": server.client_url}}),
        ):
            status, headers, body = _get(server, 443, f"/.well-known/matrix/{path}")
            assert status == 200, body
            assert headers["content-type"].split(";")[0] == "application/json"
            assert headers["access-control-allow-origin"] == "*"
            assert json.loads(body) == expected


def test_edge_serves_health_and_not_the_admin_api(cluster: Cluster) -> None:
    for port in (443, 8448):
        status, _, body = _get(cluster.hs1, port, "/health")
        assert (status, body) == (200, b"OK")
        status, _, body = _get(cluster.hs1, port, "/_synapse/admin/v1/server_version")
        assert status == 404, body


def test_clients_logged_in_through_the_edges(users: Users) -> None:
    # The fixture logged in with matrix-nio after discovering each base URL
    # from /.well-known/matrix/client on the edge.
    assert users.alice.user_id == "@alice:hs1.test"
    assert users.bob.user_id == "@bob:hs2.test"


def test_escaped_alias_and_state_key_on_the_local_server(
    clients: Clients, alice_room: dict
) -> None:
    for alias in (alice_room["alias"], EXTRA_ALIAS):
        resolved = clients.call("resolve_alias", name="alice", alias=alias)
        assert resolved["room_id"] == alice_room["room_id"]
    state = clients.call(
        "get_state",
        name="alice",
        room_id=alice_room["room_id"],
        event_type=STATE_TYPE,
        state_key=STATE_KEY,
    )
    assert state["content"] == {"note": "escaped state key", "room": "alice"}


def test_alias_resolves_over_federation(clients: Clients, alice_room: dict) -> None:
    """Bob's server asks Alice's server (a federation directory query)."""
    resolved = clients.call("resolve_alias", name="bob", alias=alice_room["alias"])
    assert resolved["room_id"] == alice_room["room_id"]
    assert "hs1.test" in resolved["servers"]


def test_invite_and_join_across_servers(
    users: Users, clients: Clients, shared_room: str
) -> None:
    # Bob's server got the room's state over federation, the state event
    # with the escaped key included.
    members = clients.call("members", name="bob", room_id=shared_room)["user_ids"]
    assert members == sorted([users.alice.user_id, users.bob.user_id])
    state = clients.call(
        "get_state",
        name="bob",
        room_id=shared_room,
        event_type=STATE_TYPE,
        state_key=STATE_KEY,
    )
    assert state["content"] == {"note": "escaped state key", "room": "alice"}


def test_join_by_escaped_alias_over_federation(
    users: Users, clients: Clients, bob_room: dict
) -> None:
    """Alice joins Bob's room on hs2 by its alias: a directory query, then
    make_join and send_join to hs2."""
    joined = clients.call("join", name="alice", room=bob_room["alias"])
    assert joined["room_id"] == bob_room["room_id"]
    wait_for(
        "bob's server to see alice joined",
        lambda: (
            users.alice.user_id
            in clients.call("members", name="bob", room_id=bob_room["room_id"])[
                "user_ids"
            ]
            or None
        ),
        60,
    )


@pytest.mark.parametrize(("sender", "receiver"), [("alice", "bob"), ("bob", "alice")])
def test_message_reaches_a_waiting_long_poll(
    users: Users, clients: Clients, shared_room: str, sender: str, receiver: str
) -> None:
    body = f"hello from {sender} at {time.time()} ✓"
    clients.call("start_long_poll", name=receiver)
    sent = clients.call("send_message", name=sender, room_id=shared_room, body=body)
    seen = clients.call(
        "finish_long_poll", name=receiver, room_id=shared_room, body=body, within=60
    )
    assert seen["event_id"] == sent["event_id"]
    assert seen["sender"] == getattr(users, sender).user_id


def test_large_media_local_and_over_federation(
    users: Users, clients: Clients, shared_room: str
) -> None:
    uploaded = clients.call(
        "upload", name="alice", size=MEDIA_SIZE, filename="e2e blob+1.bin"
    )
    assert uploaded["mxc"].startswith("mxc://hs1.test/")
    local = clients.call("download", name="alice", mxc=uploaded["mxc"])
    assert (local["size"], local["sha256"]) == (MEDIA_SIZE, uploaded["sha256"])
    assert local["filename"] == "e2e blob+1.bin"
    assert local["content_type"] == "application/octet-stream"
    # Bob's server fetches it from Alice's over federation.
    remote = clients.call("download", name="bob", mxc=uploaded["mxc"])
    assert (remote["size"], remote["sha256"]) == (MEDIA_SIZE, uploaded["sha256"])


def test_upload_over_the_limit_is_refused(clients: Clients) -> None:
    """max_upload_size is 50M in both the edge and Synapse."""
    answer = clients.try_call(
        "upload", name="alice", size=50 * 1024 * 1024 + 1, filename="too big"
    )
    assert not answer["ok"]
    assert (answer["status"], answer["errcode"]) == (413, "M_TOO_LARGE"), answer


def test_synapse_records_the_real_client_address(
    cluster: Cluster, users: Users, clients: Clients
) -> None:
    """Synapse trusts X-Forwarded-For from the edge, and the edge sets it to
    the address the client connected from, replacing any it sent."""
    devices = clients.call("devices", name="alice")["devices"]
    last_seen = {d["device_id"]: d["last_seen_ip"] for d in devices}
    assert last_seen[users.alice.device_id] == SOURCE_IPS["alice"]

    # A client that sends its own X-Forwarded-For, from yet another address.
    token = clients.call("access_token", name="alice")["access_token"]
    spoofer_ip = "127.0.0.24"
    status, _, body = _get(
        cluster.hs1,
        443,
        "/_matrix/client/v3/account/whoami",
        headers={
            "Authorization": f"Bearer {token}",
            "X-Forwarded-For": SPOOFED_ADDRESS,
            "User-Agent": "e2e-spoofer",
        },
        source_ip=spoofer_ip,
    )
    assert status == 200, body

    def addresses() -> set[str] | None:
        whois = cluster.hs1.whois(users.hs1_admin_token, users.alice.user_id)
        seen = {
            connection["ip"]
            for device in whois["devices"].values()
            for session in device["sessions"]
            for connection in session["connections"]
        }
        return seen if spoofer_ip in seen else None

    seen = wait_for("Synapse to record the spoofing request", addresses, 30)
    assert SOURCE_IPS["alice"] in seen
    assert SPOOFED_ADDRESS not in seen
    # Synapse never saw the edge's own address as a client.
    assert "127.0.0.1" not in seen and cluster.hs1.ip not in seen


def _get(
    server,
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    source_ip: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context(cafile=str(server.pki.ca_cert_path))
    connection = http.client.HTTPSConnection(
        server.server_name,
        port,
        context=context,
        timeout=30,
        source_address=(source_ip, 0) if source_ip else None,
    )
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            body,
        )
    finally:
        connection.close()

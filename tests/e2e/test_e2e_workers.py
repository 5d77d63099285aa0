"""Synapse split into workers behind matrix-edge's ``workers:`` routing.

hs4.test runs Synapse's main process, two synchrotrons, a client reader and
an event creator, replicating over a redis-server from Debian's packages
(see workers.py). Its edge names them as pools; each request carries a
marker in its query string, and the Synapse access logs say which process
served it:

- requests land where the shipped routing table says;
- each user's syncs stay on one synchrotron, whatever connection, address,
  device or way of passing the token they come with;
- with a synchrotron stopped its users' syncs go to the other one at once,
  with both stopped to the main process, and no new request fails; once a
  synchrotron is back (and the edge's health check has seen it) its users
  return to it;
- Synapse gets the forwarded headers it expects on every request the edge
  makes, its own whoami lookups included.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest

from tests.e2e import environment
from tests.e2e.homeserver import request_json
from tests.e2e.processes import ProcessGroup
from tests.e2e.topology import PASSWORD, WORKERS_HOST
from tests.e2e.workers import (
    MAIN,
    Landing,
    Redis,
    WorkersHomeserver,
    new_marker,
    with_marker,
)
from tests.pki import make_pki

pytestmark = pytest.mark.e2e

# Six users are enough for both synchrotrons to have some (checked below).
USER_NAMES = ("ana", "ben", "cleo", "dev", "eli", "fay")
# Requests take these source addresses in turn, each over a new connection.
# Seven, prime to the number of users, so that each user's syncs come from
# ever other addresses.
SOURCE_IPS = tuple(f"127.0.0.{n}" for n in range(40, 47))
SYNCS_PER_USER = 4
SYNCHROTRONS = ("synchrotron1", "synchrotron2")
# From a worker answering /health again to the edge sending it requests:
# its health check of a member that is down runs every second.
BACK_WITHIN = 15.0
# The long-poll in flight when its synchrotron stops: parked for this long,
# and it must have had an answer (any) this long after the stop.
PARKED_MS = 4_000
IN_FLIGHT_ENDS_WITHIN = 20.0


@attrs.frozen
class Account:
    name: str
    user_id: str
    token: str


@pytest.fixture(scope="module")
def hs4(
    e2e_python: Path,
    processes: ProcessGroup,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkersHomeserver]:
    """Redis, Synapse's main process and workers, and the edge, all up;
    stopped by PID when the module ends."""
    try:
        redis_server = environment.ensure_redis_server()
    except environment.Unavailable as e:
        pytest.skip(f"Synapse's workers need redis-server: {e}")
    root = tmp_path_factory.mktemp("e2e-workers", numbered=True)
    name, ip = WORKERS_HOST
    redis = Redis(redis_server, ip, root / "redis")
    server = WorkersHomeserver(name, ip, root / name, make_pki(root / "pki"))
    processes.extra_logs.extend(server.access_logs().values())
    started = time.monotonic()
    try:
        redis.start(processes)
        server.redis_port = redis.port
        server.write_configs()
        server.start_all(processes, e2e_python)
        print(
            f"\ne2e: {name} with {len(server.workers)} workers up in "
            f"{time.monotonic() - started:.1f}s"
        )
        yield server
    finally:
        server.stop_all(processes)
        if redis.process is not None:
            processes.stop(redis.process)


@pytest.fixture(scope="module")
def accounts(hs4: WorkersHomeserver) -> dict[str, Account]:
    """Users registered on the main process with the shared secret."""
    registered = {}
    for name in USER_NAMES:
        result = hs4.register(name, PASSWORD)
        registered[name] = Account(name, result["user_id"], result["access_token"])
    return registered


@pytest.fixture(scope="module")
def room(hs4: WorkersHomeserver, accounts: dict[str, Account]) -> str:
    """A room of ana's, made on the main process directly."""
    status, body = request_json(
        "POST",
        f"{hs4.main_url}/_matrix/client/v3/createRoom",
        {"name": "workers"},
        token=accounts["ana"].token,
    )
    assert status == 200, body
    return str(body["room_id"])


class Syncs:
    """/sync through the edge, each over a new connection from the next
    source address, remembering each user's ``since``."""

    def __init__(self, server: WorkersHomeserver):
        self.server = server
        self.since: dict[str, str] = {}
        self._next_ip = 0
        self._lock = threading.Lock()

    def _source_ip(self) -> str:
        with self._lock:
            self._next_ip += 1
            return SOURCE_IPS[self._next_ip % len(SOURCE_IPS)]

    def target(self, account: Account, timeout_ms: int = 0) -> str:
        target = f"/_matrix/client/v3/sync?timeout={timeout_ms}"
        since = self.since.get(account.name)
        return target + (f"&since={quote(since)}" if since else "")

    def request(
        self, account: Account, timeout_ms: int = 0, token_in_query: bool = False
    ) -> tuple[int, Any, str, str]:
        """Status, body, target and marker of one sync; ``since`` moves on
        if it succeeded. The token goes in the Authorization header, or in
        the legacy ``access_token`` parameter."""
        marker = new_marker()
        target = self.target(account, timeout_ms)
        if token_in_query:
            target += f"&access_token={quote(account.token)}"
        status, body = self.server.edge_request(
            "GET",
            with_marker(target, marker),
            token=None if token_in_query else account.token,
            source_ip=self._source_ip(),
            timeout=timeout_ms / 1000 + 30,
        )
        if status == 200:
            self.since[account.name] = body["next_batch"]
        return status, body, target, marker

    def sync(self, account: Account, token_in_query: bool = False) -> Landing:
        """One sync that must succeed; where it was served."""
        status, body, target, marker = self.request(
            account, token_in_query=token_in_query
        )
        assert status == 200, (
            f"GET {target} as {account.user_id} through the edge: {status} {body}"
        )
        return self.server.landing(marker)


@pytest.fixture(scope="module")
def syncs(hs4: WorkersHomeserver) -> Syncs:
    return Syncs(hs4)


@pytest.fixture(scope="module")
def placement(accounts: dict[str, Account], syncs: Syncs) -> dict[str, str]:
    """Which synchrotron served each user's first (initial) sync."""
    return {name: syncs.sync(account).process for name, account in accounts.items()}


def _pool_of(server: WorkersHomeserver, process: str) -> str:
    return MAIN if process == MAIN else server.workers[process].spec.pool


def test_requests_land_where_the_table_says(
    hs4: WorkersHomeserver, accounts: dict[str, Account], room: str
) -> None:
    """One request per route of interest, each served by a process of the
    pool the shipped table names (the main process if none)."""
    ana = accounts["ana"]
    room_path = f"/_matrix/client/v3/rooms/{quote(room)}"
    cases: list[tuple[str, str, Any, str]] = [
        ("GET", "/_matrix/client/v3/sync?timeout=0", None, "synchrotron"),
        ("GET", f"{room_path}/messages?dir=b&limit=5", None, "client_reader"),
        ("GET", f"{room_path}/joined_members", None, "client_reader"),
        ("GET", f"{room_path}/state", None, "client_reader"),
        (
            "PUT",
            f"{room_path}/send/m.room.message/txn{new_marker()}",
            {"msgtype": "m.text", "body": "routed"},
            "event_creator",
        ),
        # Not in the table: the main process.
        (
            "POST",
            f"/_matrix/client/v3/user/{quote(ana.user_id)}/openid/request_token",
            {},
            MAIN,
        ),
        # No push rules writer is configured: its route is dropped, and any
        # generic worker may read them.
        ("GET", "/_matrix/client/v3/pushrules/", None, "client_reader"),
    ]
    seen = []
    for n, (method, target, body, expected_pool) in enumerate(cases):
        marker = new_marker()
        source_ip = SOURCE_IPS[n % len(SOURCE_IPS)]
        status, answer = hs4.edge_request(
            method, with_marker(target, marker), ana.token, body, source_ip
        )
        assert status == 200, f"{method} {target}: {status} {answer}"
        landing = hs4.landing(marker)
        seen.append((method, target, expected_pool, landing, source_ip))
    wrong = [
        f"{method} {target}: expected pool {pool}, served by {landing.process}"
        for method, target, pool, landing, _ in seen
        if _pool_of(hs4, landing.process) != pool
    ]
    assert not wrong, "\n".join(wrong)
    # Every process saw the client's own address (X-Forwarded-For).
    addresses = [(landing.process, landing.client, ip) for *_, landing, ip in seen]
    assert all(client == ip for _, client, ip in addresses), addresses


def test_route_command_agrees_with_the_access_logs(
    hs4: WorkersHomeserver, accounts: dict[str, Account], syncs: Syncs, room: str
) -> None:
    """``twistd matrix-edge route`` names the process that then serves the
    request."""
    ana = accounts["ana"]
    targets = [
        ("GET", f"/_matrix/client/v3/rooms/{quote(room)}/messages?dir=b", ana),
        ("GET", "/_matrix/client/v3/joined_rooms", ana),
        ("GET", "/_matrix/client/v3/account/whoami", ana),
        *(("GET", "/_matrix/client/v3/sync?since=x", a) for a in accounts.values()),
    ]
    with ThreadPoolExecutor(4) as pool:
        predicted = list(
            pool.map(lambda t: hs4.predicted_process(t[0], t[1], t[2].user_id), targets)
        )
    wrong = []
    for (method, target, account), expected in zip(targets, predicted, strict=True):
        if target.endswith("since=x"):
            served = syncs.sync(account).process
        else:
            marker = new_marker()
            status, answer = hs4.edge_request(
                method, with_marker(target, marker), account.token
            )
            assert status == 200, f"{method} {target}: {status} {answer}"
            served = hs4.landing(marker).process
        if served != expected:
            wrong.append(
                f"{method} {target} as {account.user_id}: route says "
                f"{expected}, served by {served}"
            )
    assert not wrong, "\n".join(wrong)


def test_a_users_syncs_stay_on_one_synchrotron(
    hs4: WorkersHomeserver,
    accounts: dict[str, Account],
    syncs: Syncs,
    placement: dict[str, str],
) -> None:
    """Several syncs per user, interleaved with the others' and each over a
    new TLS connection from another address, one with the token in the
    query string, and then from a second device: all on the synchrotron
    that served the user's initial sync."""
    served: dict[str, list[str]] = {name: [first] for name, first in placement.items()}
    for n in range(SYNCS_PER_USER - 1):
        for name, account in accounts.items():
            # Once with the token as a query parameter, as old clients do.
            in_query = n == 1
            served[name].append(syncs.sync(account, in_query).process)
    moved = {name: where for name, where in served.items() if len(set(where)) > 1}
    assert not moved, f"syncs of one user served by several processes: {moved}"
    assert set(placement.values()) == set(SYNCHROTRONS), (
        f"expected the users spread over both synchrotrons: {placement}"
    )

    # Another device of the same user (a new access token): same synchrotron.
    for synchrotron in SYNCHROTRONS:
        name = next(n for n, where in placement.items() if where == synchrotron)
        status, login = hs4.edge_request(
            "POST",
            "/_matrix/client/v3/login",
            body={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": name},
                "password": PASSWORD,
            },
        )
        assert status == 200, f"login as {name}: {status} {login}"
        device = Account(f"{name}-2", login["user_id"], login["access_token"])
        served_device = [syncs.sync(device).process for _ in range(2)]
        assert served_device == [synchrotron] * 2, (
            f"{name}'s second device: served by {served_device}, "
            f"the first by {synchrotron}"
        )


def test_stopped_synchrotrons_fall_back_and_users_return(
    hs4: WorkersHomeserver,
    e2e_python: Path,
    processes: ProcessGroup,
    accounts: dict[str, Account],
    syncs: Syncs,
    placement: dict[str, str],
) -> None:
    first, second = SYNCHROTRONS
    users_of = {
        s: [accounts[name] for name, where in placement.items() if where == s]
        for s in SYNCHROTRONS
    }
    assert all(users_of.values()), f"a synchrotron without users: {placement}"
    everyone = list(accounts.values())

    def serve_all(users: list[Account]) -> dict[str, str]:
        return {a.name: syncs.sync(a).process for a in users}

    # A long-poll parked on the first synchrotron when it stops: the one
    # request allowed to fail.
    parked = users_of[first][0]
    in_flight: dict[str, Any] = {}

    def long_poll() -> None:
        status, body, _, marker = syncs.request(parked, timeout_ms=PARKED_MS)
        in_flight.update(status=status, body=body, marker=marker)

    poll = threading.Thread(target=long_poll, daemon=True)
    poll.start()
    time.sleep(1.0)

    # The first synchrotron stops: its users' syncs go to the second one at
    # once, without waiting for the edge's health check to notice.
    hs4.workers[first].stop(processes)
    after_first = serve_all(everyone)
    assert after_first == {a.name: second for a in everyone}, (
        f"with {first} stopped: {after_first}"
    )
    poll.join(IN_FLIGHT_ENDS_WITHIN)
    assert not poll.is_alive(), (
        f"the sync in flight on {first} when it stopped got no answer within "
        f"{IN_FLIGHT_ENDS_WITHIN:.0f}s"
    )
    print(
        f"\ne2e: the sync in flight on {first} when it stopped: "
        f"{in_flight.get('status')}"
    )

    # Both stopped: the main process serves the syncs, the first of them
    # too (refused by the second synchrotron, and placed again).
    hs4.workers[second].stop(processes)
    after_both = serve_all(everyone)
    assert after_both == {a.name: MAIN for a in everyone}, (
        f"with both synchrotrons stopped: {after_both}"
    )

    # The first one is back: once the edge has seen it, everyone syncs there
    # (it is the only synchrotron up), with no failed request meanwhile.
    _restart(hs4, processes, e2e_python, first)
    _wait_until_served_by(hs4, syncs, users_of[first], first)
    after_return = serve_all(everyone)
    assert after_return == {a.name: first for a in everyone}, (
        f"with only {first} up again: {after_return}"
    )

    # And the second: its own users go back to it, the others stay.
    _restart(hs4, processes, e2e_python, second)
    _wait_until_served_by(hs4, syncs, users_of[second], second)
    assert serve_all(everyone) == placement


def _restart(
    hs4: WorkersHomeserver, processes: ProcessGroup, e2e_python: Path, name: str
) -> None:
    hs4.start_worker(processes, e2e_python, name)
    hs4.workers[name].wait_ready()


def _wait_until_served_by(
    hs4: WorkersHomeserver, syncs: Syncs, users: list[Account], worker: str
) -> None:
    """Sync as the first of ``users`` until ``worker`` serves it again;
    every sync meanwhile must succeed."""
    seen: list[str] = []
    started = time.monotonic()
    while True:
        seen.append(syncs.sync(users[0]).process)
        if seen[-1] == worker:
            break
        if time.monotonic() - started > BACK_WITHIN:
            raise AssertionError(
                f"{users[0].user_id}'s syncs not back on {worker} "
                f"{BACK_WITHIN:.0f}s after its /health answered; served by {seen}"
            )
        time.sleep(0.3)
    print(
        f"\ne2e: syncs back on {worker} {time.monotonic() - started:.1f}s "
        "after its /health answered"
    )


def test_synapse_gets_complete_forwarded_headers(
    hs4: WorkersHomeserver, processes: ProcessGroup
) -> None:
    """Every request the edge made, its own whoami lookups included, told
    Synapse the scheme along with the client's address: no process warned
    about a missing X-Forwarded-Proto."""
    complaints = []
    mine = f"{hs4.label}-"
    logs = {p.log_path for p in processes.processes if p.name.startswith(mine)}
    for path in sorted(logs):
        lines = path.read_text(errors="replace").splitlines()
        for n, line in enumerate(lines):
            if "lacks an x-forwarded-proto header" in line:
                # Synapse logs the request itself when it is done.
                served = next(
                    (x for x in lines[n + 1 :] if "Processed request" in x), "?"
                )
                complaints.append(f"{path.name}: {served.split(' - ', 4)[-1]}")
    assert not complaints, (
        f"{len(complaints)} requests without X-Forwarded-Proto, e.g.:\n"
        + "\n".join(complaints[:3])
    )

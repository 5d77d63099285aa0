"""The worker routing dry run, ``twistd matrix-edge -c CONFIG route`` and
``routes``: every pattern of the shipped table goes where the table says
with every pool configured, and keys hash the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from matrix_edge.commands.route import explain_route, request_target
from matrix_edge.config.routes import Policy, Route
from matrix_edge.pools import hashing
from matrix_edge.pools.dispatch import Dispatcher
from matrix_edge.pools.keys import room_key
from matrix_edge.pools.table import shipped_table
from matrix_edge.target import parse_query
from tests import processes
from tests.route_choices import choices, dispatcher_for, field
from tests.route_examples import Example, examples

SHIPPED = shipped_table()
SINGLE = {pool for r in SHIPPED.routes if r.policy is Policy.SINGLE for pool in r.pools}
ALL_POOLS = sorted({pool for route in SHIPPED.routes for pool in route.pools})

USER = "@alice:example.org"
ORIGIN = "remote.example"
TOKEN = "tok-alice-DEVICE1"


def _every_pool(main_port: int = 8008) -> dict:
    """One address for each single-process pool, two for the others."""
    pools: dict[str, list[str]] = {}
    port = 9000
    for name in ALL_POOLS:
        count = 1 if name in SINGLE else 2
        pools[name] = [f"http://127.0.0.1:{port + i}" for i in range(count)]
        port += count
    return {
        "listeners": [{"port": 8080, "bind_addresses": ["127.0.0.1"]}],
        "upstream": f"http://127.0.0.1:{main_port}",
        "workers": {"pools": pools},
    }


@pytest.fixture(scope="module")
def every_pool_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("route-command") / "edge.yaml"
    return processes.write_config(path, _every_pool(processes.free_port()))


@pytest.fixture(scope="module")
def dispatcher(every_pool_config) -> Dispatcher:
    return dispatcher_for(str(every_pool_config))


def _expected_route(example: Example) -> Route:
    """The first route that lists the example's pattern and takes its method
    and query: the route it was made for, or the stream writer that an
    earlier route repeats the pattern for."""
    params = parse_query(example.query)
    return next(
        route
        for route in SHIPPED.routes
        if example.pattern in [p.pattern.decode() for p in route.patterns]
        and (route.methods is None or example.method in route.methods)
        and all(params.get(k) == v for k, v in route.query)
    )


def _all_examples() -> list[tuple[Route, Example]]:
    return [(route, example) for route in SHIPPED.routes for example in examples(route)]


def _report(dispatcher: Dispatcher, example: Example) -> str:
    return explain_route(
        dispatcher,
        example.method.decode(),
        example.target.decode(),
        user=USER,
        origin=ORIGIN,
    )


@pytest.mark.parametrize(
    "route", SHIPPED.routes, ids=[route.name for route in SHIPPED.routes]
)
def test_every_example_goes_to_its_route_and_pool(dispatcher, route):
    cases = examples(route)
    assert cases
    wrong = []
    for example in cases:
        expected = _expected_route(example)
        report = _report(dispatcher, example)
        pool = dispatcher.pools[expected.pools[0]]
        addresses = [str(m.upstream.address) for m in pool.members]
        got = (
            field(report, "route"),
            field(report, "pool"),
            field(report, "policy"),
        )
        want = (
            expected.name,
            f"{pool.name} [{', '.join(addresses)}]",
            expected.policy.value,
        )
        if got != want:
            wrong.append(f"{example}: {got} != {want}")
            continue
        worker = field(report, "worker")
        assert worker in addresses, (str(example), report)
        key = _expected_key(expected.policy, example)
        if key is None:
            assert "  key:" not in report, report
        else:
            assert field(report, "key") == key, report
            members = [(a.encode(), a) for a in addresses]
            assert worker == hashing.choose(key.encode(), members), report
    assert not wrong, "\n".join(wrong)


def _expected_key(policy: Policy, example: Example) -> str | None:
    if policy is Policy.USER:
        return USER
    if policy is Policy.ORIGIN:
        return ORIGIN
    if policy is Policy.ROOM:
        room = room_key(example.path)
        return room.decode() if room else example.target.decode()
    if policy is Policy.URI:
        return example.target.decode()
    if policy is Policy.SOURCE_IP:
        return "192.0.2.1"
    return None


def test_every_pool_gets_requests(dispatcher):
    pools = {
        field(_report(dispatcher, example), "pool").split(" ")[0]
        for _, example in _all_examples()
    }
    assert pools == set(ALL_POOLS)


def test_unmatched_and_refused_requests(dispatcher):
    report = explain_route(dispatcher, "POST", "/_matrix/client/v3/logout")
    assert report == (
        "POST /_matrix/client/v3/logout\n"
        "  route:  none matches: main\n"
        "  pool:   main\n"
        f"  worker: {dispatcher.main.address}\n"
    )
    report = explain_route(dispatcher, "GET", "/_matrix/client/v3/sync?since=s\x01")
    assert "refused before routing" in report
    assert "worker:" not in report


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (
            "https://matrix.example.org/_matrix/client/v3/sync?since=s1&timeout=30000",
            "/_matrix/client/v3/sync?since=s1&timeout=30000",
        ),
        (
            "HTTP://[2001:db8::1]:8448/_matrix/federation/v1/send/t%2F1?",
            "/_matrix/federation/v1/send/t%2F1?",
        ),
        ("https://user@hs:443/a//b/%2e?x=%20+y#frag", "/a//b/%2e?x=%20+y"),
        ("https://hs.example", "/"),
        ("https://hs.example?x=1", "/?x=1"),
        ("/_matrix/client/versions", "/_matrix/client/versions"),
        ("ftp://hs/_matrix", "ftp://hs/_matrix"),
    ],
)
def test_request_target_of_a_url(url, target):
    assert request_target(url) == target


def test_a_full_url_routes_as_its_path(dispatcher):
    room = "!OGEhHVWSdvArJzumhm%3Aexample.org"
    path = f"/_matrix/client/v3/rooms/{room}/messages?dir=b&from=t%2B1"
    by_path = explain_route(dispatcher, "GET", path, user=USER)
    by_url = explain_route(
        dispatcher, "GET", f"https://matrix.example.org:8443{path}", user=USER
    )
    assert by_url == by_path
    assert by_url.splitlines()[0] == f"GET {path}"
    assert field(by_url, "route") == "room-messages"
    # A URL whose path would be refused is refused as the path would be.
    report = explain_route(dispatcher, "GET", "https://hs/_matrix/client/../x")
    assert "refused before routing: The request path contains a dot segment" in report


# Real processes


def _twistd(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [processes.TWISTD, "-n", "--pidfile=", "matrix-edge", "-c", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=processes.REPO,
        env=dict(os.environ, PYTHONPATH=str(processes.REPO)),
    )


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stdout + stderr
    return stdout, stderr


def test_routes_prints_the_effective_table(every_pool_config):
    stdout, _ = _finish(_twistd(every_pool_config, "routes"))
    lines = stdout.splitlines()
    assert lines[0] == (
        f"Routing table: Synapse {SHIPPED.synapse_release} docs/workers.md, "
        f"{len(SHIPPED.routes)} routes in effect, first match wins; "
        "anything else goes to main."
    )
    headings = [line for line in lines if line and not line.startswith(" ")]
    route_lines = headings[1 : 1 + len(SHIPPED.routes)]
    assert [line.split(" ")[0] for line in route_lines] == [
        r.name for r in SHIPPED.routes
    ]
    assert all(" (shipped): " in line for line in route_lines)
    assert "sync (shipped): synchrotron -> main, by user, methods any" in lines
    assert (
        "initial-sync (shipped): initial_sync -> synchrotron -> main, by user, "
        "methods any" in lines
    )
    assert "media (shipped): media_repository, by round_robin, methods any" in lines
    assert "    when since absent" in lines
    for route in SHIPPED.routes:
        for pattern in route.patterns:
            assert f"    {pattern.pattern.decode()}" in lines
    assert "Left out" not in stdout
    pools = lines[lines.index("Pools:") + 1 :]
    document = _every_pool()
    assert [line.split(":")[0].strip() for line in pools] == [*ALL_POOLS, "main"]
    assert "  typing: http://127.0.0.1:" in stdout
    assert len(pools[ALL_POOLS.index("synchrotron")].split(", ")) == len(
        document["workers"]["pools"]["synchrotron"]
    )


def test_route_commands(tmp_path, every_pool_config, dispatcher):
    """A handful of ``route`` commands at once, one with a token that main's
    whoami knows and one with a token it does not: no token is printed."""
    main_port = processes.free_port()
    document = _every_pool(main_port)
    config = processes.write_config(tmp_path / "edge.yaml", document)
    main = processes.start_upstream(main_port, tmp_path / "main.log")
    room = "!OGEhHVWSdvArJzumhm%3Aexample.org"
    commands = {
        "user": ["--user", "@u7:hs", "GET", "/_matrix/client/v3/sync?since=x"],
        "origin": ["--origin", "s3.example", "PUT", "/_matrix/federation/v1/send/t1"],
        "room": ["GET", f"/_matrix/client/v3/rooms/{room}/messages?dir=b"],
        "media": ["GET", "/_matrix/media/v3/download/hs/abc"],
        "main": ["POST", "/_matrix/client/v3/logout"],
        "url": [
            "GET",
            f"https://matrix.example.org/_matrix/client/v3/rooms/{room}/messages?dir=b",
        ],
        "token": ["--token", TOKEN, "GET", "/_matrix/client/v3/sync?since=x"],
        "unknown-token": [
            "--token",
            "secret-unknown-token",
            "--client-ip",
            "198.51.100.4",
            "GET",
            "/_matrix/client/v3/sync?since=x",
        ],
    }
    try:
        running = {
            name: _twistd(config, "route", *args) for name, args in commands.items()
        }
        out = {name: _finish(process) for name, process in running.items()}
    finally:
        main.stop()
    in_process = dispatcher_for(str(config))

    stdout = out["user"][0]
    assert stdout == explain_route(
        in_process, "GET", "/_matrix/client/v3/sync?since=x", user="@u7:hs"
    )
    lines = stdout.splitlines()
    assert lines[0] == "GET /_matrix/client/v3/sync?since=x"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "route",
        "pool",
        "policy",
        "key",
        "worker",
    ]
    assert field(stdout, "key") == "@u7:hs"
    synchrotron = document["workers"]["pools"]["synchrotron"]
    assert field(stdout, "worker") == hashing.choose(
        b"@u7:hs", [(a.encode(), a) for a in synchrotron]
    )

    stdout = out["origin"][0]
    assert (field(stdout, "route"), field(stdout, "key")) == (
        "federation-send",
        "s3.example",
    )
    assert stdout == explain_route(
        in_process, "PUT", "/_matrix/federation/v1/send/t1", origin="s3.example"
    )
    stdout = out["room"][0]
    assert (field(stdout, "route"), field(stdout, "key")) == (
        "room-messages",
        "!OGEhHVWSdvArJzumhm:example.org",
    )
    assert field(stdout, "worker") == field(
        explain_route(in_process, "GET", commands["room"][1]), "worker"
    )
    stdout = out["media"][0]
    assert (field(stdout, "route"), field(stdout, "policy")) == ("media", "round_robin")
    assert "  key:" not in stdout
    assert field(stdout, "worker") in document["workers"]["pools"]["media_repository"]
    # A full URL: the same answer as its path.
    stdout = out["url"][0]
    assert stdout == out["room"][0]
    stdout = out["main"][0]
    assert field(stdout, "route") == "none matches: main"
    assert field(stdout, "worker") == document["upstream"]

    # Main's whoami names the user of the token.
    stdout = out["token"][0]
    assert field(stdout, "key") == "@alice:test"
    assert field(stdout, "worker") == hashing.choose(
        b"@alice:test", [(a.encode(), a) for a in synchrotron]
    )
    # A token whoami does not know: balanced by its digest.
    stdout = out["unknown-token"][0]
    assert stdout.startswith("whoami did not name a user")
    assert field(stdout, "key").startswith("the access token (digest ")
    for stdout, stderr in out.values():
        assert TOKEN not in stdout + stderr
        assert "secret-unknown-token" not in stdout + stderr


def test_route_help_names_both_forms(every_pool_config):
    stdout, _ = _finish(_twistd(every_pool_config, "route", "--help"))
    text = " ".join(stdout.split())
    assert "'/_matrix/client/v3/sync?since=s1'" in text
    assert "or a full URL, e.g. 'https://matrix.example.org/_matrix/client/" in text
    assert "whose scheme and host are dropped" in text


def test_route_needs_a_method_and_url(every_pool_config):
    process = _twistd(every_pool_config, "route", "--user", "@a:hs", "GET")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Traceback" not in stdout + stderr


# The same keys, the same workers, in every process


def _choices_in_process(config: Path, seed: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.route_choices", str(config), "50"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=processes.REPO,
        env=dict(os.environ, PYTHONPATH=str(processes.REPO), PYTHONHASHSEED=seed),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_keys_hash_identically_in_separate_processes(every_pool_config, dispatcher):
    # Python salts str and bytes hashes per process: different seeds make
    # sure that nothing the choice rests on uses them.
    first = _choices_in_process(every_pool_config, "1")
    second = _choices_in_process(every_pool_config, "2")
    here = choices(dispatcher, 50)
    assert first == second == here
    assert len(here) == 150
    by_route: dict[str, set[str]] = {}
    for line in here:
        route, _, worker = line.partition(" ")
        by_route.setdefault(route, set()).add(worker.rpartition(" -> ")[2])
    assert set(by_route) == {"sync", "federation-send", "room-messages"}
    # Every member of each two-member pool takes some of the keys.
    assert all(len(workers) == 2 for workers in by_route.values()), by_route

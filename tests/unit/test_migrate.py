"""migrate-workers: matrix-edge pools from a Synapse worker deployment."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from matrix_edge.commands.migrate_workers import (
    POOL_ORDER,
    SINGLE_POOLS,
    MigrationError,
    migrate_workers,
)
from matrix_edge.config.routes import Policy
from matrix_edge.config.upstream import parse_upstream
from matrix_edge.config.workers import parse_workers
from matrix_edge.pools.table import shipped_table

HOMESERVER = """\
server_name: example.com
pid_file: /var/run/matrix-synapse.pid
listeners:
  # The HTTP replication port
  - port: 9093
    bind_address: '127.0.0.1'
    type: http
    resources:
      - names: [replication]
  - port: 8008
    tls: false
    type: http
    x_forwarded: true
    bind_addresses: ['::', '0.0.0.0']
    resources:
      - names: [client, federation]
        compress: false
  - port: 9000
    type: metrics
    bind_addresses: ['127.0.0.1']
database:
  name: psycopg2
  args:
    database: synapse
redis:
  enabled: true
worker_replication_secret: "not-a-real-secret"
enable_media_repo: false
media_instance_running_background_jobs: media_repository1
start_pushers: false
pusher_instances:
  - pusher1
instance_map:
  main:
    host: localhost
    port: 9093
  stream_writer1:
    host: localhost
    port: 9101
  event_persister1:
    host: localhost
    port: 9102
stream_writers:
  events: event_persister1
  typing: stream_writer1
  to_device: stream_writer1
"""

WORKERS = {
    "synchrotron1": """\
        worker_app: synapse.app.generic_worker
        worker_name: synchrotron1
        worker_listeners:
          - type: http
            port: 8083
            bind_addresses: ['127.0.0.1']
            x_forwarded: true
            resources:
              - names: [client]
        worker_log_config: /etc/matrix-synapse/synchrotron1-log.yaml
    """,
    "synchrotron2": """\
        worker_app: synapse.app.generic_worker
        worker_name: synchrotron2
        worker_listeners:
          - type: http
            port: 8084
            bind_addresses: ['127.0.0.1']
            x_forwarded: true
            resources:
              - names: [client]
    """,
    "client_reader1": """\
        worker_app: synapse.app.generic_worker
        worker_name: client-reader-1
        worker_listeners:
          - type: http
            port: 8085
            bind_address: '127.0.0.1'
            resources:
              - names: [client]
    """,
    "event_creator1": """\
        worker_app: synapse.app.generic_worker
        worker_name: event_creator1
        worker_listeners:
          - type: http
            port: 8086
            bind_addresses: ['0.0.0.0']
            resources:
              - names: [client]
    """,
    "federation_inbound1": """\
        worker_app: synapse.app.generic_worker
        worker_name: federation_inbound1
        worker_listeners:
          - type: http
            port: 8087
            bind_addresses: ['127.0.0.1']
            resources:
              - names: [federation]
          - type: metrics
            port: 9187
    """,
    "media_repository1": """\
        worker_app: synapse.app.media_repository
        worker_name: media_repository1
        worker_listeners:
          - type: http
            path: /run/synapse/media1.sock
            mode: 0660
            x_forwarded: true
            resources:
              - names: [media]
    """,
    "stream_writer1": """\
        worker_app: synapse.app.generic_worker
        worker_name: stream_writer1
        worker_listeners:
          - type: http
            port: 8090
            bind_addresses: ['127.0.0.1']
            resources:
              - names: [client]
          - type: http
            port: 9101
            bind_addresses: ['127.0.0.1']
            resources:
              - names: [replication]
    """,
    "pusher1": """\
        worker_app: synapse.app.generic_worker
        worker_name: pusher1
        worker_log_config: /etc/matrix-synapse/pusher1-log.yaml
    """,
    "generic_worker1": """\
        worker_app: synapse.app.generic_worker
        worker_name: generic_worker1
        worker_listeners:
          - type: http
            port: 8091
            bind_addresses: ['127.0.0.1']
            resources:
              - names: [client, federation]
    """,
    "event_persister1": """\
        worker_app: synapse.app.generic_worker
        worker_name: event_persister1
        worker_listeners:
          - type: http
            port: 9102
            bind_addresses: ['127.0.0.1']
            resources:
              - names: [replication]
    """,
}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _homeserver(tmp_path, **options):
    """HOMESERVER with some options replaced."""
    config = yaml.safe_load(HOMESERVER)
    config.update(options)
    return _write(tmp_path, "homeserver.yaml", yaml.safe_dump(config))


@pytest.fixture
def deployment(tmp_path):
    """homeserver.yaml and the worker files, as paths."""
    (tmp_path / "workers").mkdir()
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    workers = [
        _write(tmp_path, f"workers/{name}.yaml", text) for name, text in WORKERS.items()
    ]
    return home, workers


def _pools(output):
    return yaml.safe_load(output)["workers"]["pools"]


def _comments(output):
    """The comment text, joined as one line, so wrapping does not matter."""
    return " ".join(
        line.strip().lstrip("#").strip()
        for line in output.splitlines()
        if line.strip().startswith("#")
    )


def test_pools(deployment):
    output = migrate_workers(*deployment)
    document = yaml.safe_load(output)
    assert document["upstream"] == "http://127.0.0.1:8008"
    assert set(document) == {"upstream", "workers"}
    assert document["workers"]["pools"] == {
        "synchrotron": ["http://127.0.0.1:8083", "http://127.0.0.1:8084"],
        "client_reader": ["http://127.0.0.1:8085", "http://127.0.0.1:8091"],
        "event_creator": ["http://127.0.0.1:8086"],
        "federation_inbound": ["http://127.0.0.1:8087"],
        "media_repository": ["unix:/run/synapse/media1.sock"],
        "typing": ["http://127.0.0.1:8090"],
        "to_device": ["http://127.0.0.1:8090"],
    }


def test_output_is_valid_matrix_edge_config(deployment):
    document = yaml.safe_load(migrate_workers(*deployment))
    assert str(parse_upstream(document["upstream"], ("upstream",))) == (
        "http://127.0.0.1:8008"
    )
    workers = parse_workers(document["workers"], ("workers",))
    assert set(workers.pools) == {
        "synchrotron",
        "client_reader",
        "event_creator",
        "federation_inbound",
        "media_repository",
        "typing",
        "to_device",
    }
    media = workers.pools["media_repository"].addresses
    assert [a.unix_path for a in media] == ["/run/synapse/media1.sock"]


def test_pools_match_the_shipped_table():
    """Every pool the migration writes is one the shipped table routes to,
    and the single-process pools are those of its `single` routes."""
    routes = shipped_table().routes
    assert set(POOL_ORDER) == {p for r in routes for p in r.pools} - {"main"}
    single = {p for r in routes if r.policy is Policy.SINGLE for p in r.pools}
    assert single == SINGLE_POOLS


def test_comments_explain_each_pool(deployment):
    output = migrate_workers(*deployment)
    comments = _comments(output)
    # Where each member comes from.
    assert "synchrotron1 (" in comments
    assert "workers/synchrotron1.yaml): by its name" in comments
    assert "stream_writer1 (" in comments
    assert "stream_writers.typing" in comments
    assert "stream_writers.to_device" in comments
    assert "media_instance_running_background_jobs" in comments
    assert "worker_app synapse.app.media_repository" in comments
    # generic_worker1 matches no role: client_reader, and says so.
    assert "generic_worker1 (" in comments
    assert "its name matches no role, and client_reader takes" in comments
    # The main process's wildcard bind address becomes loopback.
    assert "listeners[1]" in comments
    assert "binds 0.0.0.0, so reached on loopback 127.0.0.1" in comments
    # The events stream has no routes.
    assert "stream_writers.events: event persisters take no requests" in comments


def test_comments_name_left_out_workers(deployment):
    comments = _comments(migrate_workers(*deployment))
    left_out = comments[comments.index("Workers in no pool:") :]
    assert "pusher1 (" in left_out
    assert "no HTTP listener; its duties take no requests: pusher" in left_out
    # Only a replication listener: never a public address, and it says why.
    assert "event_persister1 (" in left_out
    assert (
        "no HTTP listener with the client, federation or media resource "
        "(its replication listener, the one instance_map names, must never "
        "take public traffic)"
    ) in left_out
    # Neither worker's replication port is anywhere but in comments.
    output = migrate_workers(*deployment)
    assert "9102" not in output
    assert "9101" not in output


def test_a_worker_can_be_in_several_pools(tmp_path):
    home = _homeserver(
        tmp_path,
        update_user_directory_from_worker="synchrotron1",
        stream_writers={"receipts": ["synchrotron1", "main"]},
    )
    worker = _write(tmp_path, "s1.yaml", WORKERS["synchrotron1"])
    output = migrate_workers(home, [worker])
    assert _pools(output) == {
        "synchrotron": ["http://127.0.0.1:8083"],
        "user_dir": ["http://127.0.0.1:8083"],
        "receipts": ["http://127.0.0.1:8083"],
    }
    comments = _comments(output)
    assert "stream_writers.receipts includes the main process" in comments
    # Named in homeserver.yaml, but no file given.
    assert "no worker file given: pusher1 (pusher_instances)" in comments
    assert "media_repository1 (media_instance_running_background_jobs)" in comments
    assert "stream_writer1 (instance_map)" in comments


@pytest.mark.parametrize(
    ("name", "pool"),
    [
        ("synchrotron", "synchrotron"),
        ("synchrotron12", "synchrotron"),
        ("synchrotron-2", "synchrotron"),
        ("initial_sync1", "initial_sync"),
        ("initial-synchrotron-1", "initial_sync"),
        ("initial_synchrotron", "initial_sync"),
        ("client_reader", "client_reader"),
        ("client-reader-2", "client_reader"),
        ("event-creator_3", "event_creator"),
        ("federation_inbound1", "federation_inbound"),
        ("federation-reader-1", "federation_reader"),
        ("user_dir1", "user_dir"),
        ("sso", "sso"),
        ("matrix-synapse-synchrotron-0", "synchrotron"),
        ("generic_worker3", "client_reader"),
        ("worker", "client_reader"),
    ],
)
def test_role_from_worker_name(tmp_path, name, pool):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    worker = _write(
        tmp_path,
        "worker.yaml",
        f"""\
        worker_app: synapse.app.generic_worker
        worker_name: {name}
        worker_listeners:
          - type: http
            port: 8100
            resources:
              - names: [client, federation]
        """,
    )
    assert _pools(migrate_workers(home, [worker])) == {pool: ["http://127.0.0.1:8100"]}


def test_single_pools_keep_one_address(tmp_path):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    workers = [
        _write(
            tmp_path,
            f"sso{i}.yaml",
            f"""\
            worker_app: synapse.app.generic_worker
            worker_name: sso{i}
            worker_listeners:
              - type: http
                port: {8200 + i}
                bind_addresses: ['127.0.0.1']
                resources:
                  - names: [client]
            """,
        )
        for i in (1, 2)
    ]
    output = migrate_workers(home, workers)
    assert _pools(output) == {"sso": ["http://127.0.0.1:8201"]}
    comments = _comments(output)
    assert "sso takes exactly one process" in comments
    assert "sso2 (" in comments
    parse_workers(yaml.safe_load(output)["workers"], ("workers",))


def test_addresses(tmp_path):
    home = _write(
        tmp_path,
        "homeserver.yaml",
        """\
        listeners:
          - path: /run/synapse/main_public.sock
            type: http
            resources:
              - names: [client, federation]
        """,
    )
    workers = [
        _write(
            tmp_path,
            "v6.yaml",
            """\
            worker_name: synchrotron1
            worker_app: synapse.app.generic_worker
            worker_listeners:
              - type: http
                port: 8083
                bind_addresses: ['::']
                resources: [{names: [client]}]
            """,
        ),
        _write(
            tmp_path,
            "default.yaml",
            """\
            worker_name: synchrotron2
            worker_app: synapse.app.generic_worker
            worker_listeners:
              - type: http
                port: 8084
                resources: [{names: [client]}]
            """,
        ),
        _write(
            tmp_path,
            "both.yaml",
            """\
            worker_name: synchrotron3
            worker_app: synapse.app.generic_worker
            worker_listeners:
              - type: http
                port: 8085
                bind_addresses: ['::1', '127.0.0.1']
                resources: [{names: [client]}]
            """,
        ),
        _write(
            tmp_path,
            "tls.yaml",
            """\
            worker_name: synchrotron4
            worker_app: synapse.app.generic_worker
            worker_listeners:
              - type: http
                port: 8443
                tls: true
                resources: [{names: [client]}]
              - type: http
                port: 8086
                bind_addresses: ['10.0.0.4']
                resources: [{names: [client]}]
            """,
        ),
    ]
    output = migrate_workers(home, workers)
    document = yaml.safe_load(output)
    assert document["upstream"] == "unix:/run/synapse/main_public.sock"
    assert document["workers"]["pools"] == {
        "synchrotron": [
            "http://[::1]:8083",
            "http://127.0.0.1:8084",
            "http://127.0.0.1:8085",
            "http://10.0.0.4:8086",
        ]
    }
    comments = _comments(output)
    assert "binds ::, so reached on loopback ::1" in comments
    assert "binds every interface by default, so reached on loopback" in comments
    parse_workers(document["workers"], ("workers",))


def test_roles_need_the_right_listener(tmp_path):
    home = _homeserver(tmp_path, update_user_directory_from_worker="federation_reader1")
    worker = _write(
        tmp_path,
        "fr.yaml",
        """\
        worker_name: federation_reader1
        worker_app: synapse.app.generic_worker
        worker_listeners:
          - type: http
            port: 8087
            bind_addresses: ['127.0.0.1']
            resources: [{names: [federation]}]
        """,
    )
    output = migrate_workers(home, [worker])
    assert _pools(output) == {"federation_reader": ["http://127.0.0.1:8087"]}
    assert (
        "is not in user_dir (update_user_directory_from_worker), but it has "
        "no plain HTTP listener with the client resource"
    ) in _comments(output)


def test_media_enabled_on_a_worker(tmp_path):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    worker = _write(
        tmp_path,
        "media.yaml",
        """\
        worker_name: media-2
        worker_app: synapse.app.generic_worker
        enable_media_repo: true
        worker_listeners:
          - type: http
            port: 8088
            bind_addresses: ['127.0.0.1']
            resources: [{names: [media]}]
        """,
    )
    output = migrate_workers(home, [worker])
    assert _pools(output) == {"media_repository": ["http://127.0.0.1:8088"]}
    assert "enable_media_repo: true" in _comments(output)


def test_no_worker_takes_requests(tmp_path):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    worker = _write(tmp_path, "pusher1.yaml", WORKERS["pusher1"])
    output = migrate_workers(home, [worker])
    assert yaml.safe_load(output) == {"upstream": "http://127.0.0.1:8008"}
    comments = _comments(output)
    assert "leave out the `workers` section" in comments
    assert "enable_media_repo: false, but no media repository" in comments


def test_names_stay_in_comments(tmp_path):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    worker = _write(
        tmp_path,
        "odd.yaml",
        """\
        worker_name: "odd\\nworkers: {pools: {typing: [http://10.9.9.9:1]}}"
        worker_app: synapse.app.generic_worker
        worker_listeners:
          - type: http
            port: 8100
            bind_addresses: ['127.0.0.1']
            resources: [{names: [client]}]
        """,
    )
    output = migrate_workers(home, [worker])
    assert _pools(output) == {"client_reader": ["http://127.0.0.1:8100"]}
    assert "10.9.9.9" not in yaml.safe_dump(yaml.safe_load(output))


def _error(home, workers=()):
    with pytest.raises(MigrationError) as e:
        migrate_workers(home, list(workers))
    return str(e.value)


def test_error_missing_file(tmp_path):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    missing = str(tmp_path / "nope.yaml")
    assert _error(home, [missing]) == (
        f"{missing}: cannot read it: No such file or directory"
    )
    assert _error(missing).startswith(f"{missing}: cannot read it")


def test_error_not_yaml(tmp_path):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    broken = _write(tmp_path, "broken.yaml", "worker_name: [unclosed\n")
    message = _error(home, [broken])
    assert message.startswith(f"{broken}: not valid YAML: ")
    assert "line 2" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a list\n", "expected a mapping of Synapse options, got a list"),
        ("", "expected a mapping of Synapse options, got nothing"),
        ("just words\n", "expected a mapping of Synapse options, got a string"),
    ],
)
def test_error_not_a_mapping(tmp_path, text, expected):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    worker = _write(tmp_path, "w.yaml", text)
    assert _error(home, [worker]) == f"{worker}: {expected}"


def test_error_worker_without_name(tmp_path):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    worker = _write(
        tmp_path,
        "w.yaml",
        """\
        worker_app: synapse.app.generic_worker
        worker_listeners: []
        """,
    )
    assert _error(home, [worker]).startswith(f"{worker}: worker_name: missing")


def test_error_duplicate_worker_name(tmp_path):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    first = _write(tmp_path, "a.yaml", WORKERS["synchrotron1"])
    second = _write(tmp_path, "b.yaml", WORKERS["synchrotron1"])
    assert _error(home, [first, second]) == (
        f"{second}: worker_name: 'synchrotron1' is also the name in {first}"
    )


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        (
            "{type: http, port: eighty, resources: [{names: [client]}]}",
            "worker_listeners[0].port: expected a port number",
        ),
        (
            "{type: http, port: 8083, bind_addresses: '::', "
            "resources: [{names: [client]}]}",
            "worker_listeners[0].bind_addresses: expected a list, got a string",
        ),
        (
            "{type: http, port: 8083, bind_address: 'not an address', "
            "resources: [{names: [client]}]}",
            "worker_listeners[0].bind_address: expected an IP address",
        ),
        (
            "{type: http, port: 8083, resources: [client]}",
            "worker_listeners[0].resources[0]: expected a mapping",
        ),
        (
            "{type: http, port: 8083, resources: [{names: client}]}",
            "worker_listeners[0].resources[0].names: expected a list",
        ),
        (
            "{type: http, path: run/relative.sock, resources: [{names: [client]}]}",
            "worker_listeners[0].path: expected the absolute path",
        ),
    ],
)
def test_error_bad_worker_listener(tmp_path, listener, expected):
    home = _write(tmp_path, "homeserver.yaml", HOMESERVER)
    worker = _write(
        tmp_path, "w.yaml", f"worker_name: w1\nworker_listeners: [{listener}]\n"
    )
    assert _error(home, [worker]).startswith(f"{worker}: {expected}")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {
                "listeners": [
                    {
                        "type": "http",
                        "port": 9093,
                        "resources": [{"names": ["replication"]}],
                    }
                ]
            },
            "listeners: no http listener with the client resource",
        ),
        (
            {
                "listeners": [
                    {
                        "type": "http",
                        "port": 8448,
                        "tls": True,
                        "resources": [{"names": ["client"]}],
                    }
                ]
            },
            "listeners[0]: the listeners with the client resource use TLS",
        ),
        ({"listeners": {"port": 8008}}, "listeners: expected a list, got a mapping"),
        (
            {"stream_writers": ["typing"]},
            "stream_writers: expected a mapping, got a list",
        ),
        (
            {"stream_writers": {"typing": {"a": "b"}}},
            "stream_writers.typing: expected a worker name or a list of them",
        ),
        (
            {"pusher_instances": [1, 2]},
            "pusher_instances: expected a worker name or a list of them",
        ),
        ({"instance_map": ["main"]}, "instance_map: expected a mapping, got a list"),
        ({"worker_name": "synchrotron1"}, "this is a worker's config file"),
    ],
)
def test_error_bad_homeserver(tmp_path, options, expected):
    home = _homeserver(tmp_path, **options)
    assert _error(home).startswith(f"{home}: {expected}")

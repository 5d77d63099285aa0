"""Configuration parsing: values in Synapse's syntax, errors naming keys."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from matrix_edge.config._base import (
    ConfigError,
    format_path,
    parse_duration,
    parse_size,
)
from matrix_edge.config.edge import default_config_text, load_config, parse_config
from matrix_edge.config.log_level import LogLevelSetting
from matrix_edge.config.well_known import check_server_name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1024, 1024),
        ("512", 512),
        ("1K", 1024),
        ("50M", 50 << 20),
        ("2g", 2 << 30),
        ("1T", 1 << 40),
        ("10MB", 10 << 20),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value, ("x",)) == expected


@pytest.mark.parametrize("value", ["", "M", "1.5M", "-1", -5, "1P", True, None, [1]])
def test_parse_size_rejects(value):
    with pytest.raises(ConfigError) as e:
        parse_size(value, ("max_upload_size",))
    assert str(e.value).startswith("max_upload_size: ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (500, 0.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1.5s", 1.5),
    ],
)
def test_parse_duration(value, expected):
    assert parse_duration(value, ("x",)) == expected


@pytest.mark.parametrize("value", ["30", "s", "5 years", "-1s", -1, False, 1.5])
def test_parse_duration_rejects(value):
    with pytest.raises(ConfigError):
        parse_duration(value, ("timeouts", "body_idle"))


def test_format_path():
    assert format_path(("listeners", 1, "tls", "certificate_path")) == (
        "listeners[1].tls.certificate_path"
    )
    assert format_path(()) == ""


def _minimal(**extra):
    document = {"listeners": [{"port": 8080}], "upstream": "http://127.0.0.1:8008"}
    document.update(extra)
    return document


def test_defaults():
    config = parse_config(_minimal())
    [listener] = config.listeners
    assert listener.bind_addresses == ("::", "0.0.0.0")
    assert listener.type.value == "client"
    assert listener.tls is None
    assert listener.tag == "client-8080"
    assert listener.scheme == b"http"
    assert config.max_upload_size == 50 << 20
    assert config.trusted_proxies == ()
    assert config.timeouts.upstream_connect == 5.0
    assert config.timeouts.upstream_response == 180.0
    assert config.timeouts.request_body == 900.0
    assert config.upstream.host == "127.0.0.1"
    assert config.upstream.port == 8008
    assert not config.well_known.enabled


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("debug", LogLevelSetting.DEBUG),
        ("info", LogLevelSetting.INFO),
        ("INFO", LogLevelSetting.INFO),
        ("warn", LogLevelSetting.WARN),
        # Python logging's names, as in Synapse's log config.
        ("WARNING", LogLevelSetting.WARN),
        ("error", LogLevelSetting.ERROR),
    ],
)
def test_log_level(value, expected):
    assert parse_config(_minimal()).log_level is LogLevelSetting.INFO
    assert parse_config(_minimal(log_level=value)).log_level is expected


def test_values_are_frozen():
    config = parse_config(_minimal())
    with pytest.raises(AttributeError):
        config.max_upload_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("http://127.0.0.1:8008", ("127.0.0.1", 8008, "")),
        ("http://[::1]:8008", ("::1", 8008, "")),
        ("http://synapse.internal", ("synapse.internal", 80, "")),
        ("unix:/run/synapse/main.sock", ("", 0, "/run/synapse/main.sock")),
    ],
)
def test_upstream_forms(upstream, expected):
    address = parse_config(_minimal(upstream=upstream)).upstream
    assert (address.host, address.port, address.unix_path) == expected


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"listeners": [{"port": 1}]}, "upstream: required"),
        (_minimal(upstream="https://x:8008"), "upstream: expected http://"),
        (_minimal(upstream="http://x:8008/"), None),
        (_minimal(upstream="http://x:8008/_matrix"), "upstream: give the address only"),
        (_minimal(upstream="unix:relative.sock"), "upstream: a unix socket needs"),
        (
            _minimal(listeners=[{"port": 1, "type": "admin"}]),
            "listeners[0].type: expected",
        ),
        (
            _minimal(listeners=[{"port": 1, "bind_addresses": ["localhost"]}]),
            "listeners[0].bind_addresses[0]: expected an IP address",
        ),
        (
            _minimal(listeners=[{"port": 1}, {"port": 1}]),
            "listeners[1].port: :: port 1 is already used",
        ),
        (
            _minimal(
                listeners=[{"port": 1, "tls": {"certificate_path": "/nonexistent"}}]
            ),
            "listeners[0].tls.certificate_path: file not found: /nonexistent",
        ),
        (_minimal(trusted_proxies="10.0.0.0/8"), "trusted_proxies: expected a list"),
        (
            _minimal(trusted_proxies=["10.0.0.1/8"]),
            "trusted_proxies[0]: expected a CIDR",
        ),
        (
            _minimal(timeouts={"upstream_connect": 0}),
            "timeouts.upstream_connect: must be greater",
        ),
        (_minimal(timeouts={"sync": "1s"}), "timeouts.sync: unknown key"),
        (
            _minimal(timeouts={"request_body": "0s"}),
            "timeouts.request_body: must be greater than zero",
        ),
        (
            _minimal(timeouts={"request_body": "soon"}),
            "timeouts.request_body: expected a duration",
        ),
        (
            _minimal(upstream_pool={"max_idle_connections": 0}),
            "upstream_pool.max_idle_connections: must be at least 1",
        ),
        (
            _minimal(access_log={"enabled": "yes"}),
            "access_log.enabled: expected true or false",
        ),
        (
            _minimal(access_log={"path": "/nonexistent/dir/access.log"}),
            "access_log.path: directory not found: /nonexistent/dir",
        ),
        (
            _minimal(access_log={"format": "xml"}),
            "access_log.format: expected 'text' or 'json'",
        ),
        (_minimal(well_known={"server": "x:99999"}), "well_known.server: invalid port"),
        (
            _minimal(well_known={"client": "https://x"}),
            "well_known.client: expected a mapping",
        ),
        (
            _minimal(listeners=[{"port": 1, "http2": True}]),
            "listeners[0].http2: HTTP/2 needs `tls`",
        ),
        (
            _minimal(log_level="verbose"),
            "log_level: expected one of debug, info, warn or error, got 'verbose'",
        ),
        (
            _minimal(log_level=10),
            "log_level: expected one of debug, info, warn or error, got 10",
        ),
        (_minimal(extra=1), "extra: unknown key"),
        ([], "expected a mapping"),
    ],
)
def test_errors_name_the_key(document, message):
    if message is None:
        parse_config(document)
        return
    with pytest.raises(ConfigError) as e:
        parse_config(document)
    assert message in str(e.value)


def test_trusted_proxies_parsed():
    config = parse_config(_minimal(trusted_proxies=["10.0.0.0/8", "2001:db8::/32"]))
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_well_known_documents():
    config = parse_config(
        _minimal(
            well_known={
                "server": "hs1.test:8448",
                "client": {"m.homeserver": {"base_url": "https://hs1.test"}},
            }
        )
    )
    assert config.well_known.server == b'{"m.server": "hs1.test:8448"}'
    assert (
        config.well_known.client
        == b'{"m.homeserver": {"base_url": "https://hs1.test"}}'
    )
    assert config.well_known.support is None


@pytest.mark.parametrize(
    "name",
    [
        "example.org",
        "example.org:8448",
        "1.2.3.4:443",
        "[::1]",
        "[2001:db8::1]:8448",
        "localhost",
    ],
)
def test_server_names_accepted(name):
    check_server_name(name, ("well_known", "server"))


@pytest.mark.parametrize(
    "name",
    [
        "",
        "exa mple.org",
        "example.org:",
        "example.org:0",
        "[::1",
        "[nope]:1",
        "a..b",
        "x:65536",
        "https://x",
    ],
)
def test_server_names_refused(name):
    with pytest.raises(ConfigError):
        check_server_name(name, ("well_known", "server"))


def test_generated_config_documents_every_key():
    document = yaml.safe_load(default_config_text())
    for listener in document["listeners"]:
        del listener["tls"]
        listener.pop("http2", None)
    config = parse_config(document)
    # Every key the parser knows appears in the generated file.
    import matrix_edge.config.edge as edge

    assert set(edge._TOP_KEYS) <= set(document) | {"max_request_size"}
    assert config.listeners[0].port == 443
    assert config.listeners[1].port == 8448
    assert config == parse_config(
        {
            "listeners": [{"port": 443}, {"port": 8448, "type": "federation"}],
            "upstream": "http://127.0.0.1:8008",
        }
    )


# Bare durations under a second ----------------------------------------------


def _warnings(**extra) -> list[str]:
    return [str(w) for w in parse_config(_minimal(**extra)).warnings]


def test_a_bare_duration_under_a_second_is_a_warning():
    config = parse_config(_minimal(timeouts={"upstream_response": 180}))
    assert config.timeouts.upstream_response == 0.18
    [warning] = config.warnings
    assert warning.path == ("timeouts", "upstream_response")
    assert str(warning) == (
        "timeouts.upstream_response: 180 is 180 ms (a bare number is "
        "milliseconds, as in Synapse); write 180s for seconds, or 180ms if "
        "milliseconds are meant"
    )


@pytest.mark.parametrize("value", ["180s", "180ms", "0.5s", 1000, 30000, "3m"], ids=str)
def test_durations_with_a_unit_or_of_a_second_or_more_are_not(value):
    assert _warnings(timeouts={"upstream_response": value}) == []


def test_every_duration_key_is_checked():
    warnings = _warnings(
        timeouts={"upstream_connect": 5, "client_idle": 120},
        upstream_pool={"idle_timeout": 60},
        upstream_check={"interval": 5},
        maintenance={"retry_after": 300},
        workers={
            "pools": {
                "synchrotron": {
                    "addresses": ["http://127.0.0.1:8083"],
                    "queue_timeout": 5,
                }
            },
            "whoami_cache": {"ttl": 600},
        },
    )
    assert [w.split(":")[0] for w in warnings] == [
        "upstream_pool.idle_timeout",
        "upstream_check.interval",
        "timeouts.upstream_connect",
        "timeouts.client_idle",
        "maintenance.retry_after",
        "workers.pools.synchrotron.queue_timeout",
        "workers.whoami_cache.ttl",
    ]


def test_warnings_do_not_make_configurations_differ():
    assert parse_config(_minimal(timeouts={"body_idle": 60})) == parse_config(
        _minimal(timeouts={"body_idle": "60ms"})
    )
    assert parse_config(_minimal()).warnings == ()


def test_parse_duration_alone_warns_nobody():
    # Outside parse_config there is nowhere for a warning to go.
    assert parse_duration(5, ("x",)) == 0.005


# server_header -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "matrix-edge"),
        ("matrix-edge", "matrix-edge"),
        ("example.org edge/2", "example.org edge/2"),
        (False, None),
        ("", None),
    ],
)
def test_server_header(value, expected):
    document = _minimal() if value is None else _minimal(server_header=value)
    assert parse_config(document).server_header == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "server_header: expected a header value such as 'matrix-edge', or "),
        (7, "server_header: expected a header value"),
        ("bad\r\nX-Injected: 1", "server_header: not a valid header value"),
        ("caf\u00e9", "server_header: not a valid header value"),
        (" padded", "server_header: not a valid header value"),
        ("x" * 257, "server_header: at most 256 characters"),
    ],
)
def test_server_header_refused(value, message):
    with pytest.raises(ConfigError) as e:
        parse_config({**_minimal(), "server_header": value})
    assert message in str(e.value)


def test_unreadable_reason_says_what_is_wrong_with_a_file(tmp_path):
    from matrix_edge.config.files import unreadable_reason

    present = tmp_path / "key.pem"
    present.write_text("x")
    assert unreadable_reason(str(present)) is None
    assert unreadable_reason(str(tmp_path / "nope.pem")) == (
        f"file not found: {tmp_path / 'nope.pem'}"
    )
    assert unreadable_reason(str(tmp_path)) == (
        f"is a directory, not a file: {tmp_path}"
    )


def test_changed_keys_are_named_as_in_the_file():
    from matrix_edge.config.changes import changed_keys

    base = {
        "listeners": [{"port": 8443, "bind_addresses": ["127.0.0.1"]}],
        "upstream": "http://127.0.0.1:8008",
    }
    old = parse_config(base)
    assert changed_keys(old, parse_config(base)) == []
    new = parse_config(
        {
            **base,
            "listeners": [{"port": 9443, "bind_addresses": ["127.0.0.1"]}],
            "upstream": "http://127.0.0.1:8009",
            "timeouts": {"drain": "10s"},
        }
    )
    # The tag follows the port unless set: it changed too.
    assert changed_keys(old, new) == [
        "listeners[0].port",
        "listeners[0].tag",
        "upstream",
        "timeouts.drain",
    ]
    second = {"port": 8448, "bind_addresses": ["127.0.0.1"], "type": "federation"}
    more = parse_config({**base, "listeners": [*base["listeners"], second]})
    assert changed_keys(old, more) == ["listeners"]


def test_sighup_applies_changes_and_names_what_waits_for_a_restart(tmp_path):
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import globalLogPublisher

    from matrix_edge.reload import Reloader
    from matrix_edge.service import make_service
    from tests.processes import free_port

    path = tmp_path / "edge.yaml"
    listener = f"listeners: [{{port: {free_port()}, bind_addresses: ['127.0.0.1']}}]\n"
    path.write_text(listener + "upstream: http://127.0.0.1:8008\n")
    reactor = MemoryReactorClock()
    top = make_service(load_config(str(path)), reactor, str(path))
    first = top.generation
    path.write_text(
        listener + "upstream: http://127.0.0.1:8009\n"
        "maintenance: {enabled: true}\nprocesses: 2\n"
    )
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        assert Reloader(top, str(path), reactor, reuse_port=False)()
    finally:
        globalLogPublisher.removeObserver(seen.append)
        for service in top.listeners.values():
            service.close()
    applied = [e["keys"] for e in seen if "now in effect" in e.get("log_format", "")]
    waiting = [e["keys"] for e in seen if "after a restart" in e.get("log_format", "")]
    assert applied == ["upstream, maintenance.enabled"]
    assert waiting == ["processes"]
    assert top.generation is not first
    assert top.generation.config.maintenance.enabled
    assert str(top.generation.synapse.address.port) == "8009"

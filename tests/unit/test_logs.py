"""Logs: the JSON access log as JSON Lines, ``log_level`` in front of the
observer twistd sets up, and workers' events relayed into the first
process's log once."""

from __future__ import annotations

import io
import json
import re
from datetime import datetime
from pathlib import Path

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import (
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from matrix_edge.config.log_level import LogLevelSetting
from matrix_edge.logs import (
    PROCESS_FIELD,
    child_log_observer,
    filter_twistd_log,
    relayed_event,
    twistd_observer,
)
from matrix_edge.processes import _Child
from matrix_edge.server.accesslog import Timestamps
from matrix_edge.server.accesslog_file import AccessLogFile
from tests.unit.test_site import OK, make_harness

# 2026-05-28, a time of the kind the log will see.
NOW = 1_780_000_000.25

SYNC = (
    b"GET /_matrix/client/v3/sync?access_token=syt_secret&since=s1 HTTP/1.1\r\n"
    b"Host: h\r\nUser-Agent: Element/1.0\r\n\r\n"
)


def _check_types(entry: dict) -> None:
    """What a log shipper relies on, without parsing rules of its own."""
    when = datetime.fromisoformat(entry["time"])
    assert when.tzinfo is not None
    assert isinstance(entry["timestamp"], float)
    assert when.timestamp() == pytest.approx(entry["timestamp"], abs=1e-6)
    assert type(entry["status"]) is int
    assert type(entry["client_disconnected"]) is bool
    assert type(entry["bytes"]) is int
    assert isinstance(entry["total_seconds"], float)
    assert entry["upstream_seconds"] is None or isinstance(
        entry["upstream_seconds"], float
    )
    for key in ("client", "listener", "request_id", "method", "target", "protocol"):
        assert isinstance(entry[key], str), key


def test_json_entry_in_the_log_is_the_object_itself():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = make_harness(access_log={"format": "json"})
        h.clock.advance(0.25)
        h.send(SYNC)
        h.connect_upstream()
        h.clock.advance(1)
        h.upstream_says(OK)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [
        e for e in events if e.get("log_namespace") == "matrix_edge.access.client-8443"
    ]
    entry = json.loads(formatEvent(event))
    assert entry == event["access"]
    _check_types(entry)
    assert list(entry)[:2] == ["time", "timestamp"]
    assert entry["timestamp"] == 1.25
    assert entry["status"] == 200
    assert entry["client_disconnected"] is False
    assert entry["upstream_seconds"] == 1.0
    assert entry["total_seconds"] == 1.0
    assert entry["bytes"] == 2
    assert entry["target"] == "/_matrix/client/v3/sync?access_token=<redacted>&since=s1"
    assert "syt_secret" not in formatEvent(event)


def _file_harness(tmp_path: Path, log_format: str):
    path = tmp_path / "access.log"
    h = make_harness(access_log={"format": log_format, "path": str(path)})
    log_file = AccessLogFile(h.clock, str(path))
    log_file.startService()
    h.site.access_log._file = log_file
    h.clock.advance(0.25)
    return h, log_file, path


def _client_goes_away(log_format: str, tmp_path: Path) -> str:
    """A request answered, a probe, then a request whose client leaves
    before Synapse answers; the file's text."""
    h, log_file, path = _file_harness(tmp_path, log_format)
    h.send(SYNC)
    h.connect_upstream()
    h.upstream_says(OK)
    h.send(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
    h.send(b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: h\r\n\r\n")
    h.clock.advance(0.5)
    h.channel.connectionLost(Failure(ConnectionDone()))
    log_file.stopService()
    return path.read_text()


def test_json_file_is_json_lines(tmp_path):
    text = _client_goes_away("json", tmp_path)
    assert text.endswith("}\n")
    entries = [json.loads(line) for line in text.splitlines()]
    for entry in entries:
        _check_types(entry)
    answered, gone = entries  # the probe is left out of the file
    assert (answered["status"], answered["client_disconnected"]) == (200, False)
    assert (gone["status"], gone["client_disconnected"]) == (499, True)
    assert gone["total_seconds"] == 0.5
    assert answered["timestamp"] == 0.25
    assert gone["timestamp"] == 0.75
    assert answered["time"] == (
        datetime.fromtimestamp(0.25).astimezone().isoformat(timespec="milliseconds")
    )


def test_text_file_is_unchanged(tmp_path):
    answered, gone = _client_goes_away("text", tmp_path).splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
    assert re.match(
        stamp + r" 203\.0\.113\.7 - client-8443 - \{[0-9a-f]+\} 0\.000sec "
        r'\(upstream 0\.000sec\) 2B 200 "GET /_matrix/client/v3/sync\?'
        r'access_token=<redacted>&since=s1 HTTP/1\.1" "Element/1\.0"\Z',
        answered,
    ), answered
    assert re.match(
        stamp + r" 203\.0\.113\.7 - client-8443 - \{[0-9a-f]+\} 0\.500sec "
        r'\(upstream -\) 0B 499! "GET /_matrix/client/v3/sync HTTP/1\.1" "-"\Z',
        gone,
    ), gone


@pytest.mark.parametrize(
    ("now", "millis", "epoch"),
    [
        (NOW, ".250", NOW),
        (1_780_000_000.9999, ".999", 1_780_000_000.999),
        (1_780_000_001.0, ".000", 1_780_000_001.0),
        (0.0, ".000", 0.0),
    ],
)
def test_timestamps(now, millis, epoch):
    timestamps = Timestamps()
    text, seconds = timestamps.format(now)
    assert text[19:23] == millis
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", text)
    assert seconds == pytest.approx(epoch, abs=1e-9)
    assert datetime.fromisoformat(text).timestamp() == pytest.approx(seconds)
    # Again within the same second, from the cached part.
    assert timestamps.format(now) == (text, seconds)


def test_log_level_filters_the_observer_twistd_sets_up(tmp_path):
    """twistd's own choice of observer (here --logfile), behind the filter."""
    server_options: dict = {"logfile": str(tmp_path / "twistd.log"), "nodaemon": True}
    filter_twistd_log(server_options, LogLevelSetting.WARN)
    assert server_options["logger"] == "matrix_edge.logs.twistd_observer"
    observer = twistd_observer()
    log = Logger(namespace="matrix_edge.test", observer=observer)
    log.debug("not written: debug")
    log.info("not written: info")
    log.warn("written: warn")
    log.error("written: error")
    text = (tmp_path / "twistd.log").read_text()
    assert "not written" not in text
    assert "[matrix_edge.test#warn] written: warn" in text
    assert "[matrix_edge.test#error] written: error" in text


def test_log_level_filters_an_operators_logger():
    seen: list[dict] = []
    filter_twistd_log({"logger": lambda: seen.append}, LogLevelSetting.DEBUG)
    log = Logger(namespace="matrix_edge.test", observer=twistd_observer())
    log.debug("probe")
    assert [e["log_format"] for e in seen] == ["probe"]


def _worker_output() -> bytes:
    out = io.StringIO()
    log = Logger(
        namespace="matrix_edge.access.client-443",
        observer=child_log_observer(out, LogLevelSetting.INFO),
    )
    log.info("{access_line}", access_line='1.2.3.4 - client-443 - {ab} 200 "{x}"')
    log.debug("left out at info")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("Reload callback {name} failed", name="tls")
    return out.getvalue().encode()


def test_worker_events_are_relayed_once():
    events: list[dict] = []
    worker = _Child(1, lambda *_: None)
    worker._log.observer = events.append
    data = _worker_output()
    # Lines may arrive in pieces.
    worker.childDataReceived(1, data[:17])
    worker.childDataReceived(1, data[17:])
    worker.childDataReceived(1, b"printed, not logged\n")
    worker.childDataReceived(2, b"Traceback (most recent call last):\n")
    lines = [formatEventAsClassicLogText(e) for e in events]
    assert len(lines) == 4, lines
    access, failure, printed, stderr = lines
    assert access.endswith(
        '[child-1 matrix_edge.access.client-443#info] 1.2.3.4 - client-443 - {ab} 200 "{x}"\n'
    )
    assert events[0][PROCESS_FIELD] == 1
    assert events[0]["log_namespace"] == "matrix_edge.access.client-443"
    assert events[1]["log_level"] is LogLevel.critical
    assert "[child-1 matrix_edge.access.client-443#critical] Reload callback tls" in (
        failure
    )
    assert "ZeroDivisionError: division by zero" in failure
    assert printed.endswith("[matrix_edge.child.1#info] printed, not logged\n")
    assert events[3]["log_level"] is LogLevel.error
    assert "[matrix_edge.child.1#error] Traceback" in stderr
    for line in lines:
        assert not re.search(r"\] \[", line), line


def test_relayed_event_ignores_other_lines():
    assert relayed_event("plain text", 1) is None
    assert relayed_event("{not json", 1) is None
    assert relayed_event('{"a": 1}', 1) is None

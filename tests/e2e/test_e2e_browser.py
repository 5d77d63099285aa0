"""A real browser client through matrix-edge, over HTTP/2 and HTTP/1.1.

Debian's Chromium, headless, runs browser/page.js with matrix-js-sdk against
hs1.test: log in twice (a writer and a reader session), create a room, send
messages while the reader's /sync long-poll waits for them, read them back,
upload 3 MiB of random bytes and download them again through the
authenticated media API. The page is served from http://127.0.0.1:<port>,
another origin than https://hs1.test, so every request with an access token
or a JSON body is preceded by a CORS preflight, as for Element Web.

A browser is not a test client: it speaks HTTP/2 whenever ALPN offers it,
orders its headers its own way (``content-length`` before ``authorization``),
and reuses the HPACK dynamic table across requests. The test checks that the
scenario passed and that HTTP/2 was used, from both ends: Chromium's NetLog
(its HTTP/2 sessions and the header lists it sent on them) and the edge's
access log (the protocol of every request from the browser, preflights
included). The same scenario runs again with ``--disable-http2``, against the
edge's own HTTP/1.1 protocol: Chromium's keep-alive connections, its header
order and its preflights over HTTP/1.1.

The browser trusts the suite's CA through an NSS database in a HOME of its
own, resolves hs1.test through a host rule, and can reach nothing else: every
other name resolves to nothing, which the NetLog confirms.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest

from tests.chromium import chromium_argv, trusting_home
from tests.e2e import environment
from tests.e2e.processes import NotReady, ProcessGroup, wait_for
from tests.e2e.topology import PASSWORD, Cluster

pytestmark = pytest.mark.e2e

BROWSER = Path(__file__).resolve().parent / "browser"
PAGE_SERVER = BROWSER / "page_server.py"
# Each step in the page has a bound of its own (60 s); this bounds the lot.
RESULT_TIMEOUT = 300.0
BUILD_TIMEOUT = 120.0

STEPS = [
    "versions",
    "log in browser writer",
    "log in browser reader",
    "whoami",
    "create room",
    "start the reader's sync",
    "message wakes the reader's sync",
    "send more messages",
    "read messages back",
    "upload media",
    "download media",
]

# The end of an access log line: total time, upstream time, bytes, status,
# "METHOD TARGET PROTOCOL" and "USER AGENT".
ACCESS_LINE = re.compile(
    r"\} (?P<seconds>[\d.]+)sec \(upstream [^)]*\) \d+B (?P<status>\S+) "
    r'"(?P<method>\S+) (?P<target>\S+) (?P<protocol>[^"]+)" "(?P<agent>[^"]*)"$'
)


@attrs.frozen
class Browser:
    chromium: Path
    certutil: Path
    node_modules: Path


@pytest.fixture(scope="module")
def browser(e2e_python: Path) -> Browser:
    """Chromium, certutil and the pinned npm packages, installed if missing.
    A machine that cannot have them fails the test: skipping would hide
    that the browser was never run."""
    try:
        chromium, certutil = environment.ensure_chromium()
        node_modules = environment.ensure_browser_packages()
    except environment.Unavailable as e:
        pytest.fail(f"the browser test cannot run here: {e}")
    return Browser(chromium, certutil, node_modules)


def build_site(node_modules: Path, site: Path) -> Path:
    """index.html and page.js bundled with matrix-js-sdk, in ``site``."""
    site.mkdir(parents=True)
    (site / "index.html").write_bytes((BROWSER / "index.html").read_bytes())
    result = subprocess.run(
        [
            str(node_modules / ".bin" / "esbuild"),
            str(BROWSER / "page.js"),
            "--bundle",
            "--format=esm",
            "--platform=browser",
            "--target=chrome120",
            f"--outfile={site / 'page.bundle.js'}",
            "--log-level=warning",
        ],
        env={**os.environ, "NODE_PATH": str(node_modules)},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    if result.returncode != 0:
        pytest.fail(f"esbuild could not bundle page.js:\n{result.stderr}")
    return site


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@attrs.frozen
class NetLog:
    """What Chromium's NetLog says the browser did on the network."""

    http2_hosts: set[str]
    """host:port of each HTTP/2 session."""
    http2_requests: list[list[str]]
    """The header lines ("name: value", in order) of each request sent on an
    HTTP/2 stream; Chromium strips the values of credentials."""
    connected_to: set[str]
    """address:port of each TCP connection attempt."""


def read_netlog(path: Path) -> NetLog:
    """Parse the NetLog Chromium wrote with ``--log-net-log``. A browser
    stopped before it closed the file leaves the event list open: it is cut
    after the last whole event and closed."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        data = json.loads(text[: text.rfind("},\n") + 1] + "]}")
    names = {
        number: name for name, number in data["constants"]["logEventTypes"].items()
    }
    netlog = NetLog(set(), [], set())
    for event in data["events"]:
        params = event.get("params") or {}
        name = names.get(event["type"])
        if name == "HTTP2_SESSION" and "host" in params:
            netlog.http2_hosts.add(params["host"])
        elif name == "HTTP2_SESSION_SEND_HEADERS":
            netlog.http2_requests.append(params["headers"])
        elif name == "TCP_CONNECT_ATTEMPT" and "address" in params:
            netlog.connected_to.add(params["address"])
    return netlog


def header_names(lines: list[str]) -> list[str]:
    return [line.partition(": ")[0] for line in lines]


def finished(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The page's record once it says it is done."""
    return result if result and result.get("done") else None


def access_lines(log: str, agent: str) -> list[dict[str, str]]:
    """The access log entries of requests whose user agent contains
    ``agent``."""
    entries = []
    for line in log.splitlines():
        match = ACCESS_LINE.search(line)
        if match and agent in match["agent"]:
            entries.append(match.groupdict())
    return entries


def describe_steps(result: dict[str, Any]) -> str:
    lines = []
    for step in result["steps"]:
        outcome = "ok" if step.get("ok") else f"FAILED {step.get('error')}"
        detail = step.get("detail")
        lines.append(
            f"  {step['name']}: {outcome} ({step.get('ms')} ms)"
            + (
                f" {json.dumps(detail)}"
                if detail is not None and step.get("ok")
                else ""
            )
        )
    return "\n".join(lines)


def run_browser_scenario(
    cluster: Cluster,
    processes: ProcessGroup,
    browser: Browser,
    tmp_path: Path,
    flags: Sequence[str] = (),
) -> tuple[dict, str]:
    """Run the page's scenario against hs1 in headless Chromium (with
    ``flags``); its result, and what hs1's edge logged meanwhile."""
    hs1 = cluster.hs1
    assert hs1.edge is not None
    user = f"browser-{secrets.token_hex(4)}"
    hs1.register(user, PASSWORD)
    site = build_site(browser.node_modules, tmp_path / "site")
    home = trusting_home(tmp_path / "home", browser.certutil, hs1.pki.ca_cert_path)
    # Only what the edge logs from here on is this test's.
    edge_log_start = hs1.edge.log_path.stat().st_size

    port_file = tmp_path / "page-server.port"
    result_file = tmp_path / "result.json"
    page_server = processes.start(
        "browser-page-server",
        [sys.executable, str(PAGE_SERVER), str(site), str(port_file), str(result_file)],
    )
    chromium = None
    try:
        port = wait_for(
            "the page server's port",
            lambda: int(port_file.read_text()),
            30.0,
            watch=[page_server],
        )
        # In the fragment, which the browser does not send to the page server.
        fragment = urlencode(
            {"homeserver": hs1.client_url, "user": user, "password": PASSWORD}
        )
        chromium = processes.start(
            "chromium",
            chromium_argv(
                browser.chromium,
                tmp_path / "profile",
                tmp_path / "netlog.json",
                f"http://127.0.0.1:{port}/index.html#{fragment}",
                {hs1.server_name: hs1.ip},
                # Console messages of the page into the browser's log.
                extra=["--enable-logging=stderr", "--v=0", *flags],
            ),
            env={"HOME": str(home)},
        )
        try:
            result = wait_for(
                "the page to finish",
                lambda: finished(read_result(result_file)),
                RESULT_TIMEOUT,
                watch=[chromium, page_server],
                interval=0.5,
            )
        except NotReady as e:
            partial = read_result(result_file)
            steps = describe_steps(partial) if partial else "  (no step recorded)"
            raise NotReady(f"{e}\nsteps so far:\n{steps}") from None
    finally:
        for process in (chromium, page_server):
            if process is not None:
                processes.stop(process)

    summary = describe_steps(result)
    print(f"\nbrowser scenario:\n{summary}")
    log = hs1.edge.log_path.read_bytes()[edge_log_start:].decode(errors="replace")
    return result, log


def check_scenario(result: dict, seen: list[dict]) -> None:
    """The scenario itself, whichever protocol carried it: every step
    done, the message woke a waiting /sync, media went both ways, and the
    edge logged the requests that did it."""
    summary = describe_steps(result)
    failed = [step for step in result["steps"] if not step.get("ok")]
    assert not failed, f"the browser scenario failed:\n{summary}"
    assert [step["name"] for step in result["steps"]] == STEPS, summary
    # The message reached the reader through a /sync that had been waiting
    # at the server, well before its 30 s timeout.
    woken = result["steps"][STEPS.index("message wakes the reader's sync")]
    assert woken["detail"]["arrivedAfterMs"] < 10_000, summary
    long_polls = [
        float(entry["seconds"])
        for entry in seen
        if entry["method"] == "GET"
        and re.match(r"/_matrix/client/v3/sync\?.*\bsince=", entry["target"])
        and entry["status"] == "200"
    ]
    assert any(0.5 < seconds < 25 for seconds in long_polls), long_polls
    download = result["steps"][STEPS.index("download media")]["detail"]
    assert download["path"].startswith("/_matrix/client/v1/media/download/"), download
    assert download["bytes"] == 3 * 1024 * 1024, download
    for method, target in (
        ("POST", r"/_matrix/client/v3/createRoom$"),
        ("PUT", r"/_matrix/client/v3/rooms/[^/]+/send/m\.room\.message/"),
        ("POST", r"/_matrix/media/v3/upload\b"),
    ):
        assert any(
            entry["method"] == method
            and entry["status"] == "200"
            and re.match(target, entry["target"])
            for entry in seen
        ), f"the edge logged no {method} {target} answered 200"


def test_browser_client_over_http2(
    cluster: Cluster, processes: ProcessGroup, browser: Browser, tmp_path: Path
) -> None:
    hs1 = cluster.hs1
    assert hs1.edge is not None
    result, log = run_browser_scenario(cluster, processes, browser, tmp_path)

    # The browser's side: HTTP/2 to the homeserver, nowhere else but
    # loopback, and the requests with a body and a token sent the way
    # browsers send them, content-length ahead of authorization.
    netlog = read_netlog(tmp_path / "netlog.json")
    assert netlog.http2_hosts == {f"{hs1.server_name}:443"}, netlog.http2_hosts
    assert all(a.startswith("127.") for a in netlog.connected_to), netlog.connected_to
    create_room = [
        header_names(lines)
        for lines in netlog.http2_requests
        if ":method: POST" in lines and ":path: /_matrix/client/v3/createRoom" in lines
    ]
    assert create_room, "Chromium sent no POST /createRoom on an HTTP/2 stream"
    names = create_room[0]
    assert "authorization" in names, names
    assert names.index("content-length") < names.index("authorization"), (
        f"Chromium no longer sends content-length before authorization, so this "
        f"test no longer covers that order: {names}"
    )

    # The edge's side: every request from the browser came over HTTP/2, and
    # the cross-origin ones were preflighted.
    seen = access_lines(log, "HeadlessChrome")
    assert seen, "the edge logged no request from the browser"
    protocols = {entry["protocol"] for entry in seen}
    assert protocols == {"HTTP/2"}, protocols
    preflights = [entry for entry in seen if entry["method"] == "OPTIONS"]
    assert preflights, "no CORS preflight reached the edge"
    assert all(entry["status"] in ("200", "204") for entry in preflights), preflights

    check_scenario(result, seen)


def test_browser_client_over_http11(
    cluster: Cluster, processes: ProcessGroup, browser: Browser, tmp_path: Path
) -> None:
    """The same scenario with HTTP/2 turned off in the browser: Chromium's
    HTTP/1.1 (keep-alive, its header order, CORS preflights) against the
    edge's own HTTP/1.1 protocol."""
    result, log = run_browser_scenario(
        cluster, processes, browser, tmp_path, flags=["--disable-http2"]
    )
    seen = access_lines(log, "HeadlessChrome")
    assert seen, "the edge logged no request from the browser"
    assert {entry["protocol"] for entry in seen} == {"HTTP/1.1"}
    preflights = [entry for entry in seen if entry["method"] == "OPTIONS"]
    assert preflights, "no CORS preflight reached the edge"
    assert all(entry["status"] in ("200", "204") for entry in preflights), preflights
    check_scenario(result, seen)

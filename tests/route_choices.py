"""Where a deployment's dispatcher sends many users, servers and rooms, as
the dry run reports it: run in separate processes, whose answers must be
the same.

``python -m tests.route_choices CONFIG [COUNT]`` prints one line per request.
"""

from __future__ import annotations

import sys

from matrix_edge.commands import route as explain
from matrix_edge.commands.route import explain_route
from matrix_edge.config.edge import load_config
from matrix_edge.pools.dispatch import Dispatcher


def dispatcher_for(config_path: str) -> Dispatcher:
    """The dispatcher ``twistd matrix-edge route`` builds; nothing connects."""
    from twisted.internet import reactor

    return explain.dispatcher_for(load_config(config_path), reactor)


def requests(count: int) -> list[tuple[str, str, dict[str, str]]]:
    """(method, target, explain_route options) for ``count`` users, servers
    and rooms."""
    out: list[tuple[str, str, dict[str, str]]] = []
    for i in range(count):
        out.append(("GET", "/_matrix/client/v3/sync?since=x", {"user": f"@u{i}:hs"}))
        out.append(
            ("PUT", f"/_matrix/federation/v1/send/t{i}", {"origin": f"s{i}.example"})
        )
        out.append(("GET", f"/_matrix/client/v3/rooms/!r{i}%3Ahs/messages?dir=b", {}))
    return out


def field(report: str, name: str) -> str:
    """One line of ``explain_route``'s report: ``route``, ``pool``, ``key``..."""
    for line in report.splitlines():
        label, _, value = line.strip().partition(":")
        if label == name:
            return value.strip()
    raise KeyError(name)


def choices(dispatcher: Dispatcher, count: int) -> list[str]:
    lines = []
    for method, target, options in requests(count):
        report = explain_route(dispatcher, method, target, **options)
        lines.append(
            f"{field(report, 'route')} {field(report, 'key')} -> "
            f"{field(report, 'worker')}"
        )
    return lines


if __name__ == "__main__":
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    print("\n".join(choices(dispatcher_for(sys.argv[1]), count)))

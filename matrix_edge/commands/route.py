"""The dry run: where a request would go, and the whole effective table,
printed for an operator checking a deployment before it takes traffic."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred, succeed

from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.routes import MAIN, Route
from matrix_edge.config.upstream import UpstreamAddress
from matrix_edge.pools.dispatch import (
    Dispatcher,
    RequestFacts,
    make_dispatcher,
    may_look_up,
)
from matrix_edge.pools.table import shipped_table
from matrix_edge.pools.whoami import token_digest
from matrix_edge.server.fields import HeaderFields
from matrix_edge.target import check_target, split_target
from matrix_edge.upstream.client import Upstream


def dispatcher_for(config: EdgeConfig, reactor: Any) -> Dispatcher:
    """The dispatcher of ``config``, as the edge builds it, without the
    health checks: for the dry run, which connects to nothing unless asked
    to look up a token."""
    upstreams: dict[UpstreamAddress, Upstream] = {}

    def upstream_for(address: UpstreamAddress) -> Upstream:
        if address not in upstreams:
            upstreams[address] = Upstream(
                reactor, address, config.upstream_pool, config.timeouts
            )
        return upstreams[address]

    return make_dispatcher(
        config.workers, reactor, upstream_for(config.upstream), upstream_for
    )


# The scheme and authority of a full http or https URL.
_SCHEME_AND_HOST = re.compile(r"\A[Hh][Tt][Tt][Pp][Ss]?://[^/?#]*")


def request_target(url: str) -> str:
    """The request target a client sends for ``url``: a full http(s) URL
    loses its scheme, host and any ``#fragment`` (which never reach a
    server) and keeps its path and query exactly as written; anything else
    is taken as the target itself."""
    found = _SCHEME_AND_HOST.match(url)
    if found is None:
        return url
    target = url[found.end() :].partition("#")[0]
    # ``https://host`` and ``https://host?q`` ask for the root, as curl does.
    return target if target.startswith("/") else "/" + target


def explain_route(
    dispatcher: Dispatcher,
    method: str,
    target: str,
    *,
    user: str | None = None,
    token: str | None = None,
    origin: str | None = None,
    client_ip: str = "192.0.2.1",
) -> str:
    """Where ``method target`` goes with every worker up; ``user`` stands
    for what whoami would say of the token. ``target`` may be a full URL
    (see L{request_target})."""
    target = request_target(target)
    raw_method = method.upper().encode("ascii")
    raw_target = target.encode("utf-8")
    problem = check_target(raw_method, raw_target)
    if problem is not None:
        return f"{method} {target}\n  refused before routing: {problem}\n"
    path = split_target(raw_target)[0]
    headers = HeaderFields([])
    if token is not None:
        headers.add(b"Authorization", b"Bearer " + token.encode())
    if origin is not None:
        headers.add(
            b"Authorization", b'X-Matrix origin="%s",key="-",sig="-"' % origin.encode()
        )
    facts = RequestFacts(
        raw_method, raw_target, path, raw_target[len(path) + 1 :], headers, client_ip
    )
    choice = dispatcher.explain(facts, user.encode() if user else None)
    lines = [f"{method.upper()} {target}"]
    if choice.route is None:
        lines.append("  route:  none matches: main")
    else:
        lines.append(f"  route:  {choice.route.name}")
    if choice.fell_back:
        lines.append("  pool:   main (no pool of the route has a member up)")
    elif choice.pool == MAIN:
        lines.append("  pool:   main")
    else:
        pool = dispatcher.pools[choice.pool]
        members = ", ".join(str(m.upstream.address) for m in pool.members)
        lines.append(f"  pool:   {choice.pool} [{members}]")
    if choice.policy is not None:
        lines.append(f"  policy: {choice.policy.value}")
    if choice.key is not None:
        lines.append(f"  key:    {_show_key(choice.key, token)}")
    worker = choice.member.upstream if choice.member else dispatcher.main
    lines.append(f"  worker: {worker.address}")
    return "\n".join(lines) + "\n"


def _show_key(key: bytes, token: str | None) -> str:
    if token is not None and key == token_digest(token.encode()):
        # The token itself is never printed.
        return (
            f"the access token (digest {key.hex()[:12]}); pass --user to see a user's"
        )
    return key.decode("utf-8", "backslashreplace")


def describe_table(dispatcher: Dispatcher, config: EdgeConfig) -> str:
    """The effective table, in evaluation order, and what was left out."""
    table = dispatcher.table
    lines = [
        f"Routing table: Synapse {table.synapse_release} docs/workers.md, "
        f"{len(table.routes)} routes in effect, first match wins; "
        "anything else goes to main.",
        "",
    ]
    own = {route.name for route in config.workers.routes}
    for route in table.routes:
        lines.extend(_describe(route, "config" if route.name in own else "shipped"))
    left_out = [
        route.name
        for route in shipped_table().routes
        if route.name not in {r.name for r in table.routes}
    ]
    if left_out:
        lines.append(
            "Left out (no pool configured for them; a later route or main takes "
            "their requests): " + ", ".join(left_out)
        )
    lines.append("")
    lines.append("Pools:")
    for name, pool in dispatcher.pools.items():
        members = ", ".join(str(m.upstream.address) for m in pool.members)
        limits = ""
        if pool.config.max_concurrent:
            limits = (
                f" (max {pool.config.max_concurrent} in flight each, "
                f"queue {pool.config.queue} for {pool.config.queue_timeout:g}s)"
            )
        lines.append(f"  {name}: {members}{limits}")
    lines.append(f"  main: {dispatcher.main.address}")
    return "\n".join(lines) + "\n"


def _describe(route: Route, source: str) -> Iterator[str]:
    methods = ",".join(sorted(m.decode() for m in route.methods or ())) or "any"
    yield (
        f"{route.name} ({source}): {' -> '.join(route.pools)}"
        f"{' -> main' if route.fallback else ''}, by {route.policy.value}"
        f"{' (sticky)' if route.sticky else ''}, methods {methods}"
    )
    for name, value in route.query:
        shown = "absent" if value is None else f"= {value.decode()}"
        yield f"    when {name.decode()} {shown}"
    for pattern in route.patterns:
        yield f"    {pattern.pattern.decode()}"


def lookup_user(dispatcher: Dispatcher, token: str) -> Deferred[bytes | None]:
    """Ask main's whoami which user ``token`` belongs to, under the edge's
    own rule for which tokens may be sent."""
    whoami = dispatcher.whoami
    assert whoami is not None
    raw = token.encode()
    if not may_look_up(raw):
        return succeed(None)
    return whoami.lookup(raw, token_digest(raw), b"127.0.0.1")

"""The ``workers`` section: pools of Synapse worker processes, and the
routes that send requests to them."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from matrix_edge.config._base import (
    KeyPath,
    fail,
    parse_duration,
    read_int,
    read_mapping,
    read_sequence,
)
from matrix_edge.config.routes import (
    MAIN,
    Policy,
    Route,
    parse_policy,
    parse_pool_name,
    parse_route,
)
from matrix_edge.config.upstream import UpstreamAddress, parse_upstream


@attrs.frozen
class PoolConfig:
    addresses: tuple[UpstreamAddress, ...]
    balance: Policy | None = None
    """Overrides the policy of the routes to this pool, sticky ones apart."""

    max_concurrent: int = 0
    """Requests in flight per member; 0 for no limit."""

    queue: int = 0
    """Requests that may wait, pool-wide, once every member is at its limit."""

    queue_timeout: float = 5.0


@attrs.frozen
class WhoamiCacheConfig:
    size: int = 50_000
    ttl: float = 600.0


@attrs.frozen
class WorkersConfig:
    pools: Mapping[str, PoolConfig] = attrs.field(factory=dict)
    routes: tuple[Route, ...] = ()
    """Routes from the config, replacing shipped routes of the same name or
    tried before the shipped table."""

    whoami_cache: WhoamiCacheConfig = attrs.field(factory=WhoamiCacheConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.pools)


_POOL_KEYS = ("addresses", "balance", "max_concurrent", "queue", "queue_timeout")


def parse_workers(value: object, path: KeyPath) -> WorkersConfig:
    # The table is data shipped with the package; imported here so that the
    # config values above stay free of it.
    from matrix_edge.pools.table import shipped_table

    data = read_mapping(value, path, ("pools", "routes", "whoami_cache"))
    pools_path = (*path, "pools")
    pools = {
        parse_pool_name(name, (*pools_path, name)): _parse_pool(
            entry, (*pools_path, name)
        )
        for name, entry in read_mapping(data.get("pools"), pools_path).items()
    }
    if MAIN in pools:
        fail((*pools_path, MAIN), "`main` is Synapse's main process: set `upstream`")

    routes_path = (*path, "routes")
    routes = tuple(
        parse_route(entry, (*routes_path, i))
        for i, entry in enumerate(read_sequence(data.get("routes", []), routes_path))
    )
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if route.name in seen:
            fail((*routes_path, i, "name"), f"route {route.name!r} is given twice")
        seen.add(route.name)
        for j, pool in enumerate(route.pools):
            if pool != MAIN and pool not in pools:
                fail(
                    (*routes_path, i, "pool", j)
                    if len(route.pools) > 1
                    else (*routes_path, i, "pool"),
                    f"no pool {pool!r} in workers.pools",
                )

    replaced = {route.name for route in routes}
    effective = routes + tuple(
        r for r in shipped_table().routes if r.name not in replaced
    )
    used = {pool for route in effective for pool in route.pools}
    for name, pool_config in pools.items():
        if name not in used:
            known = sorted(used - {MAIN})
            fail(
                (*pools_path, name),
                "no route sends requests to this pool (the shipped table's "
                f"pools are: {', '.join(known)}); add one under workers.routes",
            )
        single = [
            r.name for r in effective if name in r.pools and r.policy is Policy.SINGLE
        ]
        if single and len(pool_config.addresses) != 1:
            fail(
                (*pools_path, name),
                f"route {', '.join(single)} needs a single process here (a "
                f"Synapse stream writer, or SSO), got {len(pool_config.addresses)}",
            )

    return WorkersConfig(
        pools=pools,
        routes=routes,
        whoami_cache=_parse_whoami_cache(
            data.get("whoami_cache"), (*path, "whoami_cache")
        ),
    )


def _parse_pool(value: object, path: KeyPath) -> PoolConfig:
    if isinstance(value, list | tuple):
        return PoolConfig(addresses=_parse_addresses(value, path))
    data = read_mapping(value, path, _POOL_KEYS)
    if "addresses" not in data:
        fail((*path, "addresses"), "required")
    addresses = _parse_addresses(data["addresses"], (*path, "addresses"))
    balance = None
    if "balance" in data:
        balance = parse_policy(data["balance"], (*path, "balance"))
        if balance is Policy.SINGLE and len(addresses) != 1:
            fail(
                (*path, "balance"),
                f"`single` needs exactly one address, got {len(addresses)}",
            )
    queue_timeout = parse_duration(
        data.get("queue_timeout", "5s"), (*path, "queue_timeout")
    )
    return PoolConfig(
        addresses=addresses,
        balance=balance,
        max_concurrent=read_int(
            data.get("max_concurrent", 0), (*path, "max_concurrent"), minimum=0
        ),
        queue=read_int(data.get("queue", 0), (*path, "queue"), minimum=0),
        queue_timeout=queue_timeout,
    )


def _parse_addresses(value: object, path: KeyPath) -> tuple[UpstreamAddress, ...]:
    items = read_sequence(value, path)
    if not items:
        fail(path, "list at least one address")
    addresses = tuple(parse_upstream(item, (*path, i)) for i, item in enumerate(items))
    for i, address in enumerate(addresses):
        if address in addresses[:i]:
            fail((*path, i), f"{address} is listed twice")
    return addresses


def _parse_whoami_cache(value: object, path: KeyPath) -> WhoamiCacheConfig:
    data = read_mapping(value, path, ("size", "ttl"))
    defaults = WhoamiCacheConfig()
    ttl = parse_duration(data.get("ttl", "10m"), (*path, "ttl"))
    if ttl <= 0:
        fail((*path, "ttl"), "must be greater than zero")
    return WhoamiCacheConfig(
        size=read_int(data.get("size", defaults.size), (*path, "size"), minimum=1),
        ttl=ttl,
    )

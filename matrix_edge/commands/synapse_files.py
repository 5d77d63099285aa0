"""Reading Synapse's own configuration files, as ``migrate-workers`` needs
them: the main process's listeners and each worker's name, application and
HTTP listeners, with every problem a L{MigrationError} naming the file and
key."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import yaml

from matrix_edge.config._base import KeyPath, _type_name, format_path


class MigrationError(Exception):
    """A Synapse config file that cannot be read as one.

    ``str()`` gives ``FILE: key.path: message``, or ``FILE: message`` when
    the problem is the file as a whole.
    """

    def __init__(self, path: str, message: str, key: Iterable[str | int] = ()):
        self.path = path
        self.message = message
        self.key: KeyPath = tuple(key)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = format_path(self.key)
        if where:
            return f"{self.path}: {where}: {self.message}"
        return f"{self.path}: {self.message}"


PUBLIC_RESOURCES = ("client", "federation", "media")

# Synapse binds a listener with no bind_addresses to every interface.
DEFAULT_BIND_ADDRESSES = ("::", "0.0.0.0")

_HOST = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


@attrs.frozen
class Listener:
    """A plain or TLS HTTP listener, as matrix-edge would reach it."""

    key: KeyPath
    address: str
    resources: frozenset[str]
    """What it serves, with what `client` and `federation` imply."""

    tls: bool
    note: str
    """Why ``address`` is not what the file says, or empty."""


@attrs.frozen
class Worker:
    name: str
    path: str
    app: str
    listeners: tuple[Listener, ...]
    enable_media_repo: bool

    @property
    def label(self) -> str:
        return f"{self.name} ({self.path})"

    def listener_for(self, resource: str) -> Listener | None:
        """The first plain-HTTP listener serving ``resource``."""
        for listener in self.listeners:
            if resource in listener.resources and not listener.tls:
                return listener
        return None


def load(path: str) -> Mapping[str, Any]:
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise MigrationError(path, f"cannot read it: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise MigrationError(path, f"not valid YAML: {_yaml_problem(e)}") from e
    except RecursionError as e:
        raise MigrationError(path, "not valid YAML: nested too deeply") from e
    if not isinstance(data, dict):
        raise MigrationError(
            path, f"expected a mapping of Synapse options, got {_type_name(data)}"
        )
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem and e.problem_mark:
        mark = e.problem_mark
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def main_listener(path: str, shared: Mapping[str, Any]) -> Listener:
    """The listener of the main process that serves clients."""
    listeners = _read_listeners(path, shared, "listeners")
    serving = [lst for lst in listeners if "client" in lst.resources]
    for listener in serving:
        if not listener.tls:
            return listener
    if serving:
        raise MigrationError(
            path,
            "the listeners with the client resource use TLS, and matrix-edge "
            "speaks plain HTTP to Synapse: add a plain one for it",
            serving[0].key,
        )
    raise MigrationError(
        path,
        "no http listener with the client resource: matrix-edge sends Synapse's "
        "main process every request that no worker takes, and needs one",
        ("listeners",),
    )


def read_workers(paths: Sequence[str]) -> list[Worker]:
    workers: list[Worker] = []
    seen: dict[str, str] = {}
    for path in paths:
        doc = load(path)
        name = doc.get("worker_name")
        if name is None or name == "":
            raise MigrationError(
                path,
                "missing: homeserver.yaml names workers by it in stream_writers "
                "and the other shared options",
                ("worker_name",),
            )
        if not isinstance(name, str):
            raise MigrationError(
                path, f"expected a string, got {_type_name(name)}", ("worker_name",)
            )
        if name in seen:
            raise MigrationError(
                path, f"{name!r} is also the name in {seen[name]}", ("worker_name",)
            )
        seen[name] = path
        app = doc.get("worker_app") or "synapse.app.generic_worker"
        if not isinstance(app, str):
            raise MigrationError(
                path, f"expected a string, got {_type_name(app)}", ("worker_app",)
            )
        workers.append(
            Worker(
                name=name,
                path=path,
                app=app,
                listeners=tuple(_read_listeners(path, doc, "worker_listeners")),
                enable_media_repo=doc.get("enable_media_repo") is True,
            )
        )
    return workers


def _read_listeners(path: str, doc: Mapping[str, Any], key: str) -> list[Listener]:
    """The ``http`` listeners of a ``listeners`` or ``worker_listeners`` list."""
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MigrationError(path, f"expected a list, got {_type_name(value)}", (key,))
    listeners = []
    for i, entry in enumerate(value):
        where = (key, i)
        if not isinstance(entry, dict):
            raise MigrationError(
                path, f"expected a mapping, got {_type_name(entry)}", where
            )
        if entry.get("type") != "http":
            # metrics and manhole listeners take no Matrix requests.
            continue
        address, note = _listener_address(path, entry, where)
        listeners.append(
            Listener(
                key=where,
                address=address,
                resources=_read_resources(path, entry, where),
                tls=bool(entry.get("tls", False)),
                note=note,
            )
        )
    return listeners


def _read_resources(
    path: str, listener: Mapping[str, Any], where: KeyPath
) -> frozenset[str]:
    value = listener.get("resources")
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise MigrationError(
            path, f"expected a list, got {_type_name(value)}", (*where, "resources")
        )
    names: set[str] = set()
    for i, resource in enumerate(value):
        at = (*where, "resources", i)
        if not isinstance(resource, dict):
            raise MigrationError(
                path,
                f"expected a mapping such as {{names: [client]}}, "
                f"got {_type_name(resource)}",
                at,
            )
        listed = resource.get("names", [])
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise MigrationError(
                path, "expected a list of resource names", (*at, "names")
            )
        names.update(listed)
    # As Synapse does: client and federation serve media too.
    if names & {"client", "federation"}:
        names.add("media")
    return frozenset(names)


def _listener_address(
    path: str, listener: Mapping[str, Any], where: KeyPath
) -> tuple[str, str]:
    """The address a listener is reached on, and a note when it is not the
    one it is bound to."""
    socket_path = listener.get("path")
    if socket_path is not None:
        if not isinstance(socket_path, str) or not socket_path.startswith("/"):
            raise MigrationError(
                path, "expected the absolute path of a unix socket", (*where, "path")
            )
        if listener.get("port") is not None:
            raise MigrationError(
                path, "give either a port or a unix socket path, not both", where
            )
        return f"unix:{socket_path}", ""

    port = listener.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise MigrationError(
            path,
            f"expected a port number (or a unix socket `path`), got {port!r}",
            (*where, "port"),
        )
    binds = _bind_addresses(path, listener, where)
    bind = _preferred(binds or DEFAULT_BIND_ADDRESSES)
    host, note = bind, ""
    ip = _ip(bind)
    if ip is not None and ip.is_unspecified:
        host = "127.0.0.1" if ip.version == 4 else "::1"
        bound = f"binds {bind}" if binds else "binds every interface by default"
        note = f"{bound}, so reached on loopback {host}"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}", note


def _bind_addresses(
    path: str, listener: Mapping[str, Any], where: KeyPath
) -> list[str]:
    binds = listener.get("bind_addresses") or []
    if not isinstance(binds, list):
        raise MigrationError(
            path,
            f"expected a list, got {_type_name(binds)}",
            (*where, "bind_addresses"),
        )
    for i, bind in enumerate(binds):
        _check_bind(path, bind, (*where, "bind_addresses", i))
    # The older, singular option: Synapse adds it to the list.
    single = listener.get("bind_address")
    if single:
        _check_bind(path, single, (*where, "bind_address"))
        binds = [*binds, single]
    return binds


def _check_bind(path: str, bind: object, key: KeyPath) -> None:
    if isinstance(bind, str) and (_ip(bind) is not None or _HOST.match(bind)):
        return
    raise MigrationError(path, f"expected an IP address, got {bind!r}", key)


def _preferred(binds: Sequence[str]) -> str:
    """The bind address to connect to: the first IPv4 one, else the first."""
    for bind in binds:
        ip = _ip(bind)
        if ip is not None and ip.version == 4:
            return bind
    return binds[0]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None

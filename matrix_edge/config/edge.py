"""The whole configuration file: reading, validating, and the commented
default that ``--generate-config`` writes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources

import attrs
import yaml

from matrix_edge.config._base import (
    ConfigError,
    ConfigWarning,
    KeyPath,
    collecting_warnings,
    fail,
    parse_size,
    read_int,
    read_mapping,
    read_str,
    warn,
)
from matrix_edge.config.access_log import AccessLogConfig, parse_access_log
from matrix_edge.config.acme import AcmeConfig, parse_acme
from matrix_edge.config.listeners import ListenerConfig, parse_listeners
from matrix_edge.config.log_level import LogLevelSetting, parse_log_level
from matrix_edge.config.maintenance import MaintenanceConfig, parse_maintenance
from matrix_edge.config.proxies import IPNetwork, parse_networks
from matrix_edge.config.server_header import (
    DEFAULT_SERVER_HEADER,
    parse_server_header,
)
from matrix_edge.config.timeouts import TimeoutsConfig, parse_timeouts
from matrix_edge.config.upstream import (
    UpstreamAddress,
    UpstreamCheckConfig,
    UpstreamPoolConfig,
    parse_upstream,
    parse_upstream_check,
    parse_upstream_pool,
)
from matrix_edge.config.well_known import WellKnownConfig, parse_well_known
from matrix_edge.config.workers import WorkersConfig, parse_workers

DEFAULT_MAX_UPLOAD_SIZE = 50 * 1024 * 1024


@attrs.frozen
class EdgeConfig:
    listeners: tuple[ListenerConfig, ...]
    upstream: UpstreamAddress
    upstream_pool: UpstreamPoolConfig = attrs.field(factory=UpstreamPoolConfig)
    upstream_check: UpstreamCheckConfig = attrs.field(factory=UpstreamCheckConfig)
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE
    """The body limit for media uploads."""

    max_request_size: int = DEFAULT_MAX_UPLOAD_SIZE
    """The body limit for every other request."""

    request_id_header: str = "X-Request-ID"
    server_header: str | None = DEFAULT_SERVER_HEADER
    """The ``Server`` header of the edge's own answers; None for none.
    Responses from Synapse keep Synapse's."""

    processes: int = 1
    """Processes serving the listeners; more than one to use more cores."""

    trusted_proxies: tuple[IPNetwork, ...] = ()
    timeouts: TimeoutsConfig = attrs.field(factory=TimeoutsConfig)
    access_log: AccessLogConfig = attrs.field(factory=AccessLogConfig)
    log_level: LogLevelSetting = LogLevelSetting.INFO
    """The least severe events written to twistd's log (and relayed from
    child processes)."""

    well_known: WellKnownConfig = attrs.field(factory=WellKnownConfig)
    maintenance: MaintenanceConfig = attrs.field(factory=MaintenanceConfig)
    workers: WorkersConfig = attrs.field(factory=WorkersConfig)
    acme: AcmeConfig | None = None
    """Where ACME certificates come from, when any listener has them."""

    warnings: tuple[ConfigWarning, ...] = attrs.field(default=(), eq=False, repr=False)
    """Values that are valid but doubtful, for start-up and
    ``--check-config`` to show. Not part of the configuration itself: two
    configurations that differ only in these are the same."""


_TOP_KEYS = (
    "listeners",
    "upstream",
    "upstream_pool",
    "upstream_check",
    "max_upload_size",
    "max_request_size",
    "request_id_header",
    "server_header",
    "processes",
    "trusted_proxies",
    "timeouts",
    "access_log",
    "log_level",
    "well_known",
    "maintenance",
    "workers",
    "acme",
)


def parse_config(value: object, path: KeyPath = ()) -> EdgeConfig:
    """Validate a parsed YAML document into an L{EdgeConfig}, with the
    warnings of its sections in C{warnings}."""
    with collecting_warnings() as warnings:
        config = _parse_config(value, path)
    return attrs.evolve(config, warnings=tuple(warnings))


def _parse_config(value: object, path: KeyPath) -> EdgeConfig:
    data = read_mapping(value, path, _TOP_KEYS)
    for required in ("listeners", "upstream"):
        if required not in data:
            raise ConfigError((*path, required), "required")
    acme = parse_acme(data.get("acme"), (*path, "acme"))
    listeners = _with_acme_domains(
        parse_listeners(data["listeners"], (*path, "listeners")), acme, path
    )
    max_upload_size = parse_size(
        data.get("max_upload_size", DEFAULT_MAX_UPLOAD_SIZE),
        (*path, "max_upload_size"),
    )
    return EdgeConfig(
        listeners=listeners,
        upstream=parse_upstream(data["upstream"], (*path, "upstream")),
        upstream_pool=parse_upstream_pool(
            data.get("upstream_pool"), (*path, "upstream_pool")
        ),
        upstream_check=parse_upstream_check(
            data.get("upstream_check"), (*path, "upstream_check")
        ),
        max_upload_size=max_upload_size,
        max_request_size=parse_size(
            data.get("max_request_size", max_upload_size),
            (*path, "max_request_size"),
        ),
        request_id_header=_parse_header_name(
            data.get("request_id_header", "X-Request-ID"),
            (*path, "request_id_header"),
        ),
        server_header=parse_server_header(
            data.get("server_header", DEFAULT_SERVER_HEADER),
            (*path, "server_header"),
        ),
        processes=read_int(
            data.get("processes", 1), (*path, "processes"), minimum=1, maximum=256
        ),
        trusted_proxies=parse_networks(
            data.get("trusted_proxies"), (*path, "trusted_proxies")
        ),
        timeouts=parse_timeouts(data.get("timeouts"), (*path, "timeouts")),
        access_log=parse_access_log(data.get("access_log"), (*path, "access_log")),
        log_level=parse_log_level(data.get("log_level", "info"), (*path, "log_level")),
        well_known=parse_well_known(data.get("well_known"), (*path, "well_known")),
        maintenance=parse_maintenance(data.get("maintenance"), (*path, "maintenance")),
        workers=parse_workers(data.get("workers"), (*path, "workers")),
        acme=acme,
    )


def _with_acme_domains(
    listeners: tuple[ListenerConfig, ...], acme: AcmeConfig | None, path: KeyPath
) -> tuple[ListenerConfig, ...]:
    """Give ``tls: {acme: true}`` listeners the ``acme`` section's domains,
    and check that ACME listeners have a section to get them from."""
    resolved = []
    for i, listener in enumerate(listeners):
        tls = listener.tls
        if tls is None or tls.acme_domains is None:
            resolved.append(listener)
            continue
        key = (*path, "listeners", i, "tls", "acme")
        if acme is None:
            fail(key, "needs the top-level `acme` section (contact, directory, ...)")
        if not tls.acme_domains:
            if not acme.domains:
                fail(key, "`true` takes the names in `acme.domains`, which has none")
            tls = attrs.evolve(tls, acme_domains=acme.domains)
        resolved.append(attrs.evolve(listener, tls=tls))
    if acme is not None and acme.http01_port is not None:
        _check_http01_port(acme, resolved, path)
    if acme is not None and not any(
        listener.tls is not None and listener.tls.acme_domains for listener in resolved
    ):
        warn(
            (*path, "acme"),
            "no listener has `tls: {acme: ...}`, so no certificate is requested",
        )
    return tuple(resolved)


def _check_http01_port(
    acme: AcmeConfig, listeners: Sequence[ListenerConfig], path: KeyPath
) -> None:
    wildcards = {"::", "0.0.0.0"}
    ours = set(acme.http01_bind_addresses)
    for i, listener in enumerate(listeners):
        theirs = set(listener.bind_addresses)
        if listener.port == acme.http01_port and (
            ours & theirs or (ours | theirs) & wildcards
        ):
            fail(
                (*path, "acme", "http01_port"),
                f"port {acme.http01_port} is already used by listeners[{i}]",
            )


_TOKEN = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def _parse_header_name(value: object, path: KeyPath) -> str:
    name = read_str(value, path)
    if not _TOKEN.match(name):
        raise ConfigError(path, f"not a valid header name: {name!r}")
    return name


def load_config(filename: str) -> EdgeConfig:
    """Read and validate a YAML config file.

    Every problem comes out as a L{ConfigError}: a missing file, bad YAML
    (with its line), or a bad value (with its key path).
    """
    try:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(
            (), f"cannot read config file {filename}: {e.strerror}"
        ) from e
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError((), f"{filename} is not valid YAML: {e}") from e
    if document is None:
        raise ConfigError((), f"{filename} is empty")
    return parse_config(document)


def default_config_text() -> str:
    """The commented configuration with every default shown."""
    return (
        resources.files("matrix_edge.config")
        .joinpath("default.yaml")
        .read_text(encoding="utf-8")
    )

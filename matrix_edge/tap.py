"""twistd's view of matrix-edge: its command-line options and makeService.

Besides serving, ``twistd matrix-edge`` has commands for operators that
print and exit: ``route`` and ``routes`` (the worker routing dry run),
``migrate-workers`` and ``revoke`` (an ACME certificate).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from matrix_edge.config._base import ConfigError, ConfigWarning
from matrix_edge.config.edge import EdgeConfig, default_config_text, load_config

DEFAULT_CONFIG_PATH = "/etc/matrix-edge/matrix-edge.yaml"


def config_error_message(filename: str, error: ConfigError) -> str:
    return f"matrix-edge: configuration error in {filename}: {error}"


def config_warning_message(filename: str, warning: ConfigWarning) -> str:
    return f"matrix-edge: warning in {filename}: {warning}"


class RouteOptions(usage.Options):
    synopsis = "[--user @alice:example.org | --token T | --origin NAME] METHOD URL"
    longdesc = (
        "Print the route, pool, policy and worker a request would go to, "
        "with every worker up. URL is the request target as a client sends "
        "it, e.g. '/_matrix/client/v3/sync?since=s1', or a full URL, e.g. "
        "'https://matrix.example.org/_matrix/client/v3/sync?since=s1', whose "
        "scheme and host are dropped and whose path and query are kept as "
        "written. --token asks main's /account/whoami for the user, as the "
        "edge would."
    )
    optParameters = [
        ["user", None, None, "The user behind the access token."],
        ["token", None, None, "An access token (never printed)."],
        ["origin", None, None, "The X-Matrix origin of a federation request."],
        ["client-ip", None, "192.0.2.1", "The client's address."],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Options may come after METHOD URL too, as with most commands.
        takes_value = {name[:-1] for name in self.longOpt if name.endswith("=")}
        flags: list[str] = []
        positional: list[str] = []
        args = iter(options if options is not None else sys.argv[1:])
        for arg in args:
            if not arg.startswith("--"):
                positional.append(arg)
                continue
            flags.append(arg)
            if "=" not in arg and arg[2:] in takes_value:
                flags.append(next(args, ""))
        super().parseOptions(flags + positional)

    def parseArgs(self, method: str, url: str) -> None:  # type: ignore[override]
        self["method"] = method
        self["url"] = url


class RoutesOptions(usage.Options):
    synopsis = ""
    longdesc = "Print the effective worker routing table and the pools."


class MigrateOptions(usage.Options):
    synopsis = "HOMESERVER_YAML [WORKER_YAML ...]"
    longdesc = (
        "Print the matrix-edge `upstream` and `workers` configuration for an "
        "existing Synapse worker deployment: homeserver.yaml first, then "
        "every worker's config file."
    )

    def parseArgs(self, homeserver: str, *workers: str) -> None:  # type: ignore[override]
        self["homeserver"] = homeserver
        self["workers"] = workers


class RevokeOptions(usage.Options):
    synopsis = "[--reason REASON] NAME"
    longdesc = (
        "Revoke the certificate the ACME CA issued for NAME, with the edge's "
        "own account, and store a placeholder in its place; the next SIGHUP "
        "serves it and orders a new certificate."
    )
    optParameters = [
        [
            "reason",
            None,
            "unspecified",
            "unspecified, keyCompromise, superseded or cessationOfOperation.",
        ],
    ]

    def parseArgs(self, name: str) -> None:  # type: ignore[override]
        self["name"] = name


class Options(usage.Options):
    synopsis = (
        "[options] [route METHOD URL | routes | migrate-workers FILES | revoke NAME]"
    )
    longdesc = (
        "matrix-edge: a reverse proxy for Synapse that forwards Matrix "
        "traffic byte for byte. Reloads certificates on SIGHUP."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "Path to the YAML configuration file."],
    ]
    optFlags = [
        [
            "check-config",
            None,
            "Validate the configuration, print the result and exit.",
        ],
        [
            "generate-config",
            None,
            "Print a commented configuration with every default and exit.",
        ],
    ]
    subCommands = [
        ["route", None, RouteOptions, "Where a request would go, and exit."],
        ["routes", None, RoutesOptions, "Print the routing table and exit."],
        [
            "migrate-workers",
            None,
            MigrateOptions,
            "Print the pools of a Synapse worker deployment and exit.",
        ],
        ["revoke", None, RevokeOptions, "Revoke an ACME certificate and exit."],
    ]

    edge_config: EdgeConfig

    def opt_version(self) -> None:
        """Print matrix-edge's version and exit."""
        from matrix_edge.version import version

        print(f"matrix-edge {version()}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["generate-config"]:
            sys.stdout.write(default_config_text())
            raise SystemExit(0)
        if self.subCommand == "migrate-workers":
            _migrate(self.subOptions)
        try:
            self.edge_config = load_config(self["config"])
            if self["check-config"]:
                # Certificates are only known good once they have loaded.
                from matrix_edge.generation import load_tls

                load_tls(self.edge_config, prepare_acme=False)
        except ConfigError as e:
            raise SystemExit(config_error_message(self["config"], e)) from None
        if self["check-config"]:
            for warning in self.edge_config.warnings:
                print(config_warning_message(self["config"], warning), file=sys.stderr)
            if self.edge_config.acme is not None:
                from matrix_edge.acme.plan import describe_plan

                sys.stdout.write(describe_plan(self.edge_config))
            print(f"{self['config']}: configuration OK")
            raise SystemExit(0)
        if self.subCommand in ("route", "routes"):
            _dry_run(self.edge_config, self.subCommand, self.subOptions)
        if self.subCommand == "revoke":
            _revoke(self.edge_config, self.subOptions)
        if self.parent is not None:
            # twistd reads its options for the log observer after ours are
            # parsed: `log_level` filters whatever observer it sets up.
            from matrix_edge.logs import filter_twistd_log

            filter_twistd_log(self.parent, self.edge_config.log_level)


def _migrate(options: Any) -> None:
    from matrix_edge.commands.migrate_workers import MigrationError, migrate_workers

    try:
        text = migrate_workers(options["homeserver"], options["workers"])
    except MigrationError as e:
        raise SystemExit(f"matrix-edge: {e}") from None
    sys.stdout.write(text)
    raise SystemExit(0)


def _revoke(config: EdgeConfig, options: Any) -> None:
    from matrix_edge.commands.revoke import RevokeError, revoke

    try:
        text = revoke(config, options["name"], options["reason"])
    except RevokeError as e:
        raise SystemExit(f"matrix-edge: cannot revoke {options['name']}: {e}") from None
    sys.stdout.write(text)
    raise SystemExit(0)


def _dry_run(config: EdgeConfig, command: str, options: Any) -> None:
    from twisted.internet import reactor

    from matrix_edge.commands.route import (
        describe_table,
        dispatcher_for,
        explain_route,
        lookup_user,
    )

    dispatcher = dispatcher_for(config, reactor)
    if command == "routes":
        sys.stdout.write(describe_table(dispatcher, config))
        raise SystemExit(0)
    user = options["user"]
    if options["token"] is not None and user is None:
        found = _run(reactor, lambda: lookup_user(dispatcher, options["token"]))
        if found:
            user = found.decode()
        else:
            print("whoami did not name a user: balancing by the token itself")
    sys.stdout.write(
        explain_route(
            dispatcher,
            options["method"],
            options["url"],
            user=user,
            token=options["token"],
            origin=options["origin"],
            client_ip=options["client-ip"],
        )
    )
    raise SystemExit(0)


def _run(reactor: Any, start: Any) -> Any:
    """Run the reactor until the Deferred ``start()`` gives fires."""
    results: list[Any] = []

    def go() -> None:
        d = start()
        d.addBoth(results.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
    return results[0] if results and not hasattr(results[0], "trap") else None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from matrix_edge.listening import ListenError
    from matrix_edge.reload import log_warnings
    from matrix_edge.service import freeze_startup_objects, make_service

    # Logged before logging begins: twistd replays them into its log.
    log_warnings(options["config"], options.edge_config)
    # twistd calls this before it daemonises, so what fails here (a
    # certificate, a port) ends twistd itself, with the reason on stderr. Once
    # daemonised, a failure reaches the waiting parent only as an exception
    # from starting the services, cut to 100 bytes; a daemon that exits
    # otherwise leaves it waiting for ever (Twisted issue 7745).
    reactor.callWhenRunning(freeze_startup_objects)
    try:
        return make_service(options.edge_config, reactor, options["config"])
    except ConfigError as e:
        raise SystemExit(config_error_message(options["config"], e)) from None
    except ListenError as e:
        raise SystemExit(f"matrix-edge: {e}") from None

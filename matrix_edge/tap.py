"""twistd's view of matrix-edge: its command-line options and makeService."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from matrix_edge.config._base import ConfigError
from matrix_edge.config.edge import EdgeConfig, default_config_text, load_config

DEFAULT_CONFIG_PATH = "/etc/matrix-edge/matrix-edge.yaml"


def config_error_message(filename: str, error: ConfigError) -> str:
    return f"matrix-edge: configuration error in {filename}: {error}"


class Options(usage.Options):
    synopsis = "[options]"
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

    edge_config: EdgeConfig

    def postOptions(self) -> None:
        if self["generate-config"]:
            sys.stdout.write(default_config_text())
            raise SystemExit(0)
        try:
            self.edge_config = load_config(self["config"])
            if self["check-config"]:
                # Certificates are only known good once they have loaded.
                from matrix_edge.service import load_tls

                load_tls(self.edge_config)
        except ConfigError as e:
            raise SystemExit(config_error_message(self["config"], e)) from None
        if self["check-config"]:
            print(f"{self['config']}: configuration OK")
            raise SystemExit(0)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from matrix_edge.service import make_service

    try:
        return make_service(options.edge_config, reactor, options["config"])
    except ConfigError as e:
        raise SystemExit(config_error_message(options["config"], e)) from None

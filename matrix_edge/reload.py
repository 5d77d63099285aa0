"""SIGHUP: apply the configuration file as it is now, whatever changed.

As ``nginx -s reload`` does, and without losing a request: the file is read
and checked, and a new generation is built from it (certificates loaded,
new listeners bound) beside the one serving. Anything wrong leaves the
running configuration alone, and the log says why; its certificate files
are re-read all the same, so that no renewal waits on a fixed file. Otherwise the listening
sockets of the listeners both configurations have hand new connections to
the new generation, new listeners start, removed ones stop listening, and
the old generation retires: requests in flight finish on the configuration
they started with (see L{matrix_edge.generation}). With the file unchanged,
a SIGHUP re-reads the certificates and re-opens the access log, for
certificate renewals and log rotation.

Only ``processes`` waits for a restart: the processes themselves are the
ones reloading (the first passes SIGHUP on to the others).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from matrix_edge.config._base import ConfigError
from matrix_edge.config.changes import changed_keys
from matrix_edge.config.edge import EdgeConfig, load_config
from matrix_edge.config.listeners import ListenerType
from matrix_edge.generation import Generation
from matrix_edge.listening import ListenError, ListenerService, bind_all, listener_key

if TYPE_CHECKING:
    from matrix_edge.service import EdgeService

log = Logger()

RESTART_ONLY = ("processes",)


class Reloader:
    """Applies ``config_path`` to a running L{EdgeService}; called on
    SIGHUP, returns whether the reload succeeded."""

    def __init__(
        self,
        top: EdgeService,
        config_path: str,
        reactor: Any,
        reuse_port: bool,
        child: bool = False,
    ):
        """
        @param top: the service tree to reload.
        @param reuse_port: bind new listeners with SO_REUSEPORT (several
            processes each bind their own).
        @param child: this is one of the processes the first one started.
        """
        self._top = top
        self._path = config_path
        self._reactor = reactor
        self._reuse_port = reuse_port
        self._child = child

    def __call__(self) -> bool:
        path = self._path
        try:
            fresh = load_config(path)
        except ConfigError as e:
            self._refused(e)
            return False
        changed = changed_keys(self._top.config, fresh)
        if not changed:
            loaded = self._top.generation.reload_files()
            if self._top.acme is not None:
                self._top.acme.apply(fresh)
            return loaded
        log_warnings(path, fresh)
        try:
            self._apply(fresh)
        except (ConfigError, ListenError) as e:
            self._refused(e)
            return False
        applied = [k for k in changed if k.split(".")[0] not in RESTART_ONLY]
        waiting = [k for k in changed if k.split(".")[0] in RESTART_ONLY]
        if applied:
            log.info(
                "Reloaded {path}: {keys} now in effect",
                path=path,
                keys=", ".join(applied),
            )
        if waiting:
            log.warn(
                "{path}: changes to {keys} apply after a restart",
                path=path,
                keys=", ".join(waiting),
            )
        return True

    def _refused(self, error: Exception) -> None:
        """The file cannot be applied: the running configuration stays, but
        its certificate files are re-read and the access log reopened all
        the same, so that a renewal (certbot's, or the edge's own ACME
        client's) is not held back by an unrelated mistake in the file."""
        log.error(
            "Not reloading {path}: {error}; certificates and the access log "
            "re-read under the running configuration",
            path=self._path,
            error=str(error),
        )
        self._top.generation.reload_files()

    def _apply(self, fresh: EdgeConfig) -> None:
        top = self._top
        generation = Generation(
            fresh, self._reactor, top.counts, prepare_acme=not self._child
        )
        metrics_factory = next(
            (
                s.factory
                for s in top.listeners.values()
                if s.listener.type is ListenerType.METRICS
            ),
            None,
        )
        wanted = {}
        for i, listener in enumerate(fresh.listeners):
            if listener.type is ListenerType.METRICS:
                if self._child:
                    continue
                if metrics_factory is None:
                    log.warn(
                        "listeners[{index}]: a first metrics listener starts "
                        "after a restart",
                        index=i,
                    )
                    continue
                factory = metrics_factory
            else:
                factory = generation.factories[i]
            wanted[listener_key(listener)] = (i, listener, factory)

        added = [
            ListenerService(
                self._reactor,
                listener,
                factory,
                reuse_port=self._reuse_port,
                index=i,
            )
            for key, (i, listener, factory) in wanted.items()
            if key not in top.listeners
        ]
        bind_all(added)
        # Nothing can fail from here on.
        for key in [k for k in top.listeners if k not in wanted]:
            top.remove_listener(key)
        for key, service in top.listeners.items():
            i, listener, factory = wanted[key]
            service.use(factory, listener, i)
        for service in added:
            top.add_listener(service)
        top.replace_generation(generation)
        if top.acme is not None:
            top.acme.apply(fresh)


def log_warnings(config_path: str, config: EdgeConfig) -> None:
    """Log each doubtful value of ``config``, read from ``config_path``."""
    for warning in config.warnings:
        log.warn("{path}: {warning}", path=config_path, warning=str(warning))

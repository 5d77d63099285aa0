"""The private parts of Twisted the edge still relies on, in one place;
tests/unit/test_twisted_private.py fails if a Twisted release removes them.

Today there is one: twistd's choice of log observer, which ``log_level``
filters. Client connections and the upstream client are the edge's own
protocols and use none.
"""

from __future__ import annotations

from typing import Any


def twistd_default_observer(server_options: Any) -> Any:
    """The log observer twistd builds when no ``--logger`` is given, by
    twistd's own code: stdout, the rotated ``--logfile`` (with its SIGUSR1
    handler) or syslog, and the same refusal of ``--logfile -`` when
    daemonising."""
    from twisted.scripts.twistd import _SomeApplicationRunner

    logger = _SomeApplicationRunner.loggerFactory(server_options)
    return logger._getLogObserver()

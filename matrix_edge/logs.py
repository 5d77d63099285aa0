"""matrix-edge's side of twistd's log: the ``log_level`` filter, and the
events of child processes relayed into the first process's log.

twistd builds its log observer (stdout, ``--logfile``, ``--syslog`` or an
operator's ``--logger``) after the plugin's options are parsed, from the
``logger`` option when one is set. L{filter_twistd_log} sets that option to
L{twistd_observer}, a factory that builds the observer twistd would have
built and puts a twisted.logger level filter in front of it, so that
``log_level`` applies to every event of the process, Twisted's own
included, wherever twistd writes. twistd has no other hook for it: a
plugin's service is made before the application that could carry an
``ILogObserver`` component, and twistd adds its observer to the global
publisher directly.

Children (``processes`` > 1) write each event as a JSON object on a line of
their stdout; the first process reads it back into an event and publishes
it, so that it is formatted once, by twistd's observer, with the child's
time, namespace and level, and a ``child-N`` mark in the system field.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    eventFromJSON,
)
from twisted.python.reflect import namedAny

from matrix_edge import twisted_private
from matrix_edge.config.log_level import LogLevelSetting

# The field of a relayed event that names the child it came from.
PROCESS_FIELD = "matrix_edge_process"


def twisted_level(setting: LogLevelSetting) -> LogLevel:
    return LogLevel.levelWithName(setting.value)


def filtered(observer: ILogObserver, setting: LogLevelSetting) -> ILogObserver:
    """C{observer}, given only the events at C{setting} or above."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=twisted_level(setting))
    return FilteringLogObserver(observer, [predicate])


def filter_twistd_log(server_options: Any, setting: LogLevelSetting) -> None:
    """Have twistd's log observer see only events at C{setting} or above.

    @param server_options: twistd's own options (the parent of the plugin's),
        whose ``logger`` option twistd resolves by name once the plugin's
        options are parsed, and calls when logging begins.
    """
    name = f"{__name__}.{twistd_observer.__name__}"
    chosen = server_options.get("logger")
    _twistd_log.update(
        server_options=server_options,
        chosen=None if chosen == name else chosen,
        setting=setting,
    )
    server_options["logger"] = name


# What twistd_observer needs: it is named to twistd, which calls it with
# no arguments.
_twistd_log: dict[str, Any] = {}


def twistd_observer() -> ILogObserver:
    """The observer twistd would have built, or the operator's ``--logger``,
    behind the ``log_level`` filter (see L{filter_twistd_log})."""
    server_options = _twistd_log["server_options"]
    chosen = _twistd_log["chosen"]
    if chosen is not None:
        observer = (namedAny(chosen) if isinstance(chosen, str) else chosen)()
    else:
        observer = twisted_private.twistd_default_observer(server_options)
    if not ILogObserver.providedBy(observer):
        # --syslog gives a legacy observer, a function of the old log.
        observer = LegacyLogObserverWrapper(observer)
    return filtered(observer, _twistd_log["setting"])


def child_log_observer(out: IO[str], setting: LogLevelSetting) -> ILogObserver:
    """A child's log: each event at C{setting} or above as one JSON object
    on a line of C{out}, for L{relayed_event} in the first process."""
    return filtered(FileLogObserver(out, _event_line), setting)


def _event_line(event: dict[str, Any]) -> str:
    failure = event.get("log_failure")
    if failure is not None:
        # A Failure does not survive JSON with its message and traceback:
        # they travel as text, and are formatted as twistd formats them.
        event = dict(event)
        del event["log_failure"]
        event["log_traceback"] = failure.getTraceback().rstrip("\n")
        text_format = event.get("log_format")
        if text_format is None and "log_text" in event:
            text_format = "{log_text}"
        event["log_format"] = (
            f"{text_format}\n{{log_traceback}}" if text_format else "{log_traceback}"
        )
    return eventAsJSON(event) + "\n"


def relayed_event(line: str, index: int) -> dict[str, Any] | None:
    """The event a child wrote as C{line}, marked as child C{index}'s;
    None if the line is not one (output that did not go through the log)."""
    if not line.startswith("{"):
        return None
    try:
        event = eventFromJSON(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("log_time"), float):
        return None
    if event.get("log_level") not in list(LogLevel.iterconstants()):
        event["log_level"] = LogLevel.info
    system = event.get("log_system")
    if system is None:
        system = f"{event.get('log_namespace', '-')}#{event['log_level'].name}"
    event["log_system"] = f"child-{index} {system}"
    event[PROCESS_FIELD] = index
    return event

"""Example requests for the patterns of a routing table.

Every alternative of every ``(a|b)`` group is expanded, so each spelling of
an endpoint a pattern names gets a request of its own; wildcards become
realistic Matrix identifiers, %xx-escaped as clients send them; a pattern
that leaves the end of the path open gets the rest of a real request.

Only the regex constructs of Synapse's ``docs/workers.md`` patterns are
understood: literal text (an unescaped ``.`` stands for itself, as in
``org.matrix.msc4140``), ``^``, ``$``, groups of alternatives, an optional
group ``(...)?``, ``.*`` and ``[^/]+``. Anything else, or a wildcard or
open end with no example value below, raises :class:`UnknownPattern`, so
that a table change cannot quietly go untested.
"""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple, NoReturn
from urllib.parse import quote

from matrix_edge.config.routes import Route

ROOM_ID = "!OGEhHVWSdvArJzumhm%3Aexample.org"
ROOM_ALIAS = "%23lounge%3Aexample.org"
USER_ID = "%40alice%3Aexample.org"
EVENT_ID = "%24Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"
DEVICE_ID = "QBUAZIFURK"
SERVER = "remote.example"
MEDIA_ID = "AbCdEfGhIjKlMnOpQrStUvWx"

UNRESTRICTED_METHODS = (b"GET", b"PUT", b"POST", b"DELETE")
"""The methods tried on a route that accepts any."""

FILLER_QUERY = ((b"since", b"s72594_4483_1934"), (b"from", b"t47-1234_5678"))
"""Parameters every example carries unless its route's query rules them
out: with them, no example falls into the initial-sync routes by accident."""

# Wildcard values: (literal text before the wildcard ends with, the text
# after it starts with, values); the first rule that fits applies.
_WILDCARD_VALUES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # unstable/.* in the aliases pattern: an MSC prefix.
    ("/unstable/", "/rooms/", ("org.matrix.msc2432",)),
    ("/rooms/", "", (ROOM_ID,)),
    ("/directory/room/", "", (ROOM_ALIAS,)),
    ("/room/", "", (ROOM_ID,)),
    ("/quarantine_media/", "", (ROOM_ID,)),
    ("/im.nheko.summary/summary/", "", (ROOM_ALIAS, ROOM_ID)),
    ("/room_summary/", "", (ROOM_ID, ROOM_ALIAS)),
    ("/user/", "", (USER_ID,)),
    ("/users/", "", (USER_ID,)),
    ("/context/", "", (EVENT_ID,)),
    ("/delayed_events/", "/restart", ("syd_wlGAStYmBRRdjyOfaNYW",)),
    # /_synapse/admin/v1/media/<server>/<id> and friends
    ("/media/", "", (f"{SERVER}/{MEDIA_ID}", f"quarantine/{SERVER}/{MEDIA_ID}")),
    # /_synapse/admin/v1/{room,user}/<id>/media.*$
    ("/media", "", ("", "/quarantine")),
    # account data, global and per room; tags are per room
    ("/", "/account_data", (f"user/{USER_ID}", f"user/{USER_ID}/rooms/{ROOM_ID}")),
    ("/", "/tags", (f"user/{USER_ID}/rooms/{ROOM_ID}",)),
)

# The rest of a request when a pattern leaves the end open: (a regex the
# example path must match, tails); the first rule that fits applies, and
# "" is the path as it is.
_TAILS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Media
    (
        r"^/_matrix/media/$",
        (
            f"v3/download/{SERVER}/{MEDIA_ID}",
            f"r0/thumbnail/{SERVER}/{MEDIA_ID}",
            "v3/upload",
            "v3/config",
        ),
    ),
    (
        r"^/_matrix/client/v1/media/$",
        (
            f"download/{SERVER}/{MEDIA_ID}/cat.png",
            f"thumbnail/{SERVER}/{MEDIA_ID}",
            "preview_url",
            "config",
        ),
    ),
    (
        r"^/_matrix/federation/v1/media/$",
        (f"download/{MEDIA_ID}", f"thumbnail/{MEDIA_ID}"),
    ),
    # Federation
    (r"^/_matrix/federation/v1/send/$", ("1700000000000",)),
    (r"^/_matrix/federation/v1/event/$", (EVENT_ID,)),
    (
        r"^/_matrix/federation/v1/(state|state_ids|backfill|get_missing_events"
        r"|timestamp_to_event|exchange_third_party_invite|hierarchy)/$",
        (ROOM_ID,),
    ),
    (r"^/_matrix/federation/v1/event_auth/$", (f"{ROOM_ID}/{EVENT_ID}",)),
    (r"^/_matrix/federation/v1/make_(join|leave|knock)/$", (f"{ROOM_ID}/{USER_ID}",)),
    (
        r"^/_matrix/federation/v[12]/(send_join|send_leave|send_knock|invite)/$",
        (f"{ROOM_ID}/{EVENT_ID}",),
    ),
    (r"^/_matrix/federation/v1/query/$", ("directory", "profile")),
    (r"^/_matrix/federation/v1/user/devices/$", (USER_ID,)),
    (r"^/_matrix/key/v2/query$", ("", f"/{SERVER}")),
    # Client-server API
    (r"/rooms/[^/]+/send$", ("/m.room.message/m1700000000000.1",)),
    (r"/rooms/[^/]+/redact$", (f"/{EVENT_ID}/m1700000000000.2",)),
    (r"/rooms/[^/]+/state/$", ("m.room.name", f"m.room.member/{USER_ID}")),
    (r"/rooms/[^/]+/typing$", (f"/{USER_ID}",)),
    (r"/rooms/[^/]+/receipt$", (f"/m.read/{EVENT_ID}",)),
    (r"/rooms/[^/]+/event/$", (EVENT_ID,)),
    (r"/rooms/[^/]+/relations/$", (EVENT_ID, f"{EVENT_ID}/m.thread")),
    (r"/tags$", ("", "/m.favourite")),
    (r"/account_data$", ("/m.direct",)),
    (r"/sendToDevice/$", ("m.room.encrypted/m1700000000000.3",)),
    (r"/presence/$", (f"{USER_ID}/status",)),
    (r"/pushrules/$", ("", "global/", "global/override/.m.rule.master/enabled")),
    (r"/devices/$", (DEVICE_ID,)),
    (r"/keys/upload$", ("", f"/{DEVICE_ID}")),
    (r"/user/[^/]+/filter/$", ("0",)),
    (r"/room_keys/$", ("version", f"keys/{ROOM_ID}")),
    (r"/(join|knock)/$", (ROOM_ALIAS, ROOM_ID)),
    (r"/profile/$", (USER_ID, f"{USER_ID}/displayname")),
    (r"/login/sso/redirect$", ("", "/oidc-github")),
    (r"/io\.element\.msc4306/$", (f"rooms/{ROOM_ID}/thread/{EVENT_ID}/subscription",)),
    (r"^/_synapse/client/pick_username$", ("/account", "/submit")),
)


class UnknownPattern(Exception):
    """A pattern this module cannot make examples for."""


class Example(NamedTuple):
    method: bytes
    path: bytes
    query: bytes
    pattern: str
    """The pattern the example was made for."""

    @property
    def target(self) -> bytes:
        return self.path + b"?" + self.query if self.query else self.path

    def __str__(self) -> str:
        return f"{self.method.decode()} {self.target.decode()}"


def examples(route: Route) -> list[Example]:
    """Requests for every alternative of every pattern of ``route``, with
    each of its methods and a query that meets its conditions."""
    methods = sorted(route.methods) if route.methods else UNRESTRICTED_METHODS
    query = route_query(route)
    return [
        Example(method, path.encode("ascii"), query, source)
        for source in (p.pattern.decode("utf-8") for p in route.patterns)
        for path in pattern_paths(source)
        for method in methods
    ]


def route_query(route: Route) -> bytes:
    """A query string that meets ``route.query``, plus :data:`FILLER_QUERY`."""
    conditions = dict(route.query)
    params = [(k, v) for k, v in conditions.items() if v is not None]
    params += [(k, v) for k, v in FILLER_QUERY if k not in conditions]
    return b"&".join(quote(k).encode() + b"=" + quote(v).encode() for k, v in params)


def pattern_paths(source: str) -> list[str]:
    """Raw request paths for ``source``, one or more per alternative."""
    paths = []
    for tokens in _expand(_Parser(source).parse()):
        for path in _render(source, tokens):
            if re.search(source, path) is None:
                raise UnknownPattern(f"{source!r}: the example {path!r} does not match")
            paths.append(path)
    return paths


class _Wildcard(NamedTuple):
    regex: str


class _End:
    def __repr__(self) -> str:
        return "$"


class _Group(NamedTuple):
    alternatives: list[list[_Item]]


_Item = str | _Wildcard | _End | _Group
_Token = str | _Wildcard | _End

_END = _End()
_LITERAL = re.compile(r"[A-Za-z0-9/_.-]")
_WILDCARDS = (".*", "[^/]+")


class _Parser:
    """The pattern as a sequence of literal characters, wildcards, ends and
    groups."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0

    def parse(self) -> list[_Item]:
        if self.source.startswith("^"):
            self.pos = 1
        items = self._sequence()
        if self.pos != len(self.source):
            self._unknown()
        return items

    def _alternatives(self) -> list[list[_Item]]:
        alternatives = [self._sequence()]
        while self.source.startswith("|", self.pos):
            self.pos += 1
            alternatives.append(self._sequence())
        return alternatives

    def _sequence(self) -> list[_Item]:
        items: list[_Item] = []
        while self.pos < len(self.source) and self.source[self.pos] not in "|)":
            items.append(self._item())
        return items

    def _item(self) -> _Item:
        for wildcard in _WILDCARDS:
            if self.source.startswith(wildcard, self.pos):
                self.pos += len(wildcard)
                return _Wildcard(wildcard)
        char = self.source[self.pos]
        if char == "$":
            self.pos += 1
            return _END
        if char == "(":
            self.pos += 1
            alternatives = self._alternatives()
            if not self.source.startswith(")", self.pos):
                self._unknown()
            self.pos += 1
            if self.source.startswith("?", self.pos):
                self.pos += 1
                alternatives.append([])
            return _Group(alternatives)
        if _LITERAL.fullmatch(char):
            self.pos += 1
            return char
        self._unknown()

    def _unknown(self) -> NoReturn:
        raise UnknownPattern(
            f"{self.source!r}: no examples for {self.source[self.pos :]!r} "
            f"(at {self.pos})"
        )


def _expand(items: list[_Item]) -> list[list[_Token]]:
    """Every choice of alternatives, as flat token lists."""
    variants: list[list[_Token]] = [[]]
    for item in items:
        if isinstance(item, _Group):
            options = [v for alt in item.alternatives for v in _expand(alt)]
        else:
            options = [[item]]
        variants = [v + o for v in variants for o in options]
    return variants


def _render(source: str, tokens: list[_Token]) -> list[str]:
    """Paths for one variant: wildcards filled in, an open end completed."""
    open_end = True
    if _END in tokens:
        if tokens.index(_END) != len(tokens) - 1:
            raise UnknownPattern(f"{source!r}: '$' before the end of the pattern")
        tokens = tokens[:-1]
        open_end = False
    # Literal runs between the wildcards.
    parts: list[str | _Wildcard] = []
    for token in tokens:
        if isinstance(token, str) and parts and isinstance(parts[-1], str):
            parts[-1] += token
        else:
            assert not isinstance(token, _End)
            parts.append(token)
    choices: list[tuple[str, ...]] = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            choices.append((part,))
            continue
        before = parts[i - 1] if i > 0 else ""
        after = parts[i + 1] if i + 1 < len(parts) else ""
        assert isinstance(before, str) and isinstance(after, str)
        choices.append(_wildcard_values(source, before, after))
    paths = ["".join(chosen) for chosen in itertools.product(*choices)]
    if open_end:
        paths = [path + tail for path in paths for tail in _tails(source, path)]
    return paths


def _wildcard_values(source: str, before: str, after: str) -> tuple[str, ...]:
    for ends, starts, values in _WILDCARD_VALUES:
        if before.endswith(ends) and after.startswith(starts):
            return values
    raise UnknownPattern(
        f"{source!r}: no example value for a wildcard after {before!r}"
        f" and before {after!r}"
    )


def _tails(source: str, path: str) -> tuple[str, ...]:
    for regex, tails in _TAILS:
        if re.search(regex, path):
            return tails
    if path.endswith("/"):
        raise UnknownPattern(f"{source!r}: no example for the rest of {path!r}")
    return ("",)

"""``migrate-workers``: the matrix-edge pools of an existing Synapse worker
deployment.

Reads homeserver.yaml (its listeners, ``stream_writers`` and the options
that hand duties to workers) and each worker's config file (``worker_app``,
``worker_name``, ``worker_listeners``), and writes the ``upstream`` line and
the ``workers.pools`` section that send requests where the nginx rules of
Synapse's docs/workers.md would. Every choice is explained in a YAML
comment, so that the admin can check it before replacing those rules.

Addresses come from the workers' own HTTP listeners only: ``instance_map``
holds replication listeners, which must never take public traffic.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import yaml

from matrix_edge.commands.synapse_files import (
    PUBLIC_RESOURCES,
    Listener,
    MigrationError,
    Worker,
    load,
    main_listener,
    read_workers,
)
from matrix_edge.config._base import KeyPath, _type_name, format_path

# The pools in the order they are written out.
POOL_ORDER = (
    "synchrotron",
    "initial_sync",
    "client_reader",
    "event_creator",
    "federation_inbound",
    "federation_reader",
    "media_repository",
    "user_dir",
    "typing",
    "to_device",
    "account_data",
    "receipts",
    "presence",
    "push_rules",
    "device_lists",
    "thread_subscriptions",
    "sso",
)

# Pools whose routes use the `single` policy: exactly one process each.
SINGLE_POOLS = frozenset(
    {
        "typing",
        "to_device",
        "account_data",
        "presence",
        "push_rules",
        "thread_subscriptions",
        "sso",
    }
)

# The `stream_writers` entries whose endpoints matrix-edge routes to the
# writer; each names its pool.
STREAM_POOLS = {
    "typing": "typing",
    "to_device": "to_device",
    "account_data": "account_data",
    "receipts": "receipts",
    "presence": "presence",
    "push_rules": "push_rules",
    "device_lists": "device_lists",
    "thread_subscriptions": "thread_subscriptions",
}

# Role names in worker names (trailing number gone, '-' read as '_').
NAME_ROLES = {
    "synchrotron": "synchrotron",
    "initial_sync": "initial_sync",
    "initial_synchrotron": "initial_sync",
    "client_reader": "client_reader",
    "event_creator": "event_creator",
    "federation_inbound": "federation_inbound",
    "federation_reader": "federation_reader",
    "media_repository": "media_repository",
    "user_dir": "user_dir",
    "sso": "sso",
}

# Synapse's older, dedicated worker applications.
APP_ROLES = {
    "synapse.app.synchrotron": "synchrotron",
    "synapse.app.client_reader": "client_reader",
    "synapse.app.event_creator": "event_creator",
    "synapse.app.federation_reader": "federation_reader",
    "synapse.app.media_repository": "media_repository",
    "synapse.app.user_dir": "user_dir",
}
APP_DUTIES = {
    "synapse.app.pusher": "pusher",
    "synapse.app.federation_sender": "federation sender",
    "synapse.app.appservice": "application service notifier",
}

# Shared options that give workers duties with no HTTP requests of their own.
DUTY_OPTIONS = {
    "pusher_instances": "pusher",
    "federation_sender_instances": "federation sender",
    "run_background_tasks_on": "background tasks",
    "notify_appservices_from_worker": "application service notifier",
}

# How Synapse's configuration names the main process.
MAIN_NAMES = frozenset({"main", "master"})

COMMENT_WIDTH = 80

# The instance number at the end of a worker name: `synchrotron-2`.
_TRAILING_NUMBER = re.compile(r"[-_.0-9]+\Z")


# The instance number at the end of a worker name: `synchrotron-2`.
@attrs.define
class _Member:
    address: str
    worker: Worker
    why: list[str]
    note: str


@attrs.define
class _Plan:
    pools: dict[str, list[_Member]] = attrs.Factory(dict)
    pool_notes: dict[str, list[str]] = attrs.Factory(dict)
    left_out: list[str] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)


def migrate_workers(homeserver_path: str, worker_paths: Sequence[str]) -> str:
    """The matrix-edge ``upstream`` and ``workers`` config, as commented YAML,
    for the Synapse deployment of these files.

    Raises:
        MigrationError: a file is missing, is not YAML, or is not shaped as
            Synapse's config is.
    """
    shared = load(homeserver_path)
    if "worker_name" in shared or "worker_listeners" in shared:
        raise MigrationError(
            homeserver_path,
            "this is a worker's config file: give homeserver.yaml first, "
            "then the worker files",
        )
    main = main_listener(homeserver_path, shared)
    workers = read_workers(worker_paths)
    plan = _plan(homeserver_path, shared, workers)
    return _render(homeserver_path, len(workers), main, plan)


@attrs.define
class _Roles:
    """What homeserver.yaml and the worker files ask of each worker."""

    wanted: dict[str, dict[str, list[str]]] = attrs.Factory(dict)
    """pool -> worker name -> the reasons, in the order found."""

    duties: dict[str, list[str]] = attrs.Factory(dict)
    """worker name -> its duties that take no requests."""

    notes: list[str] = attrs.Factory(list)

    def want(self, pool: str, name: str, why: str) -> None:
        reasons = self.wanted.setdefault(pool, {}).setdefault(name, [])
        if why not in reasons:
            reasons.append(why)

    def duty(self, name: str, duty: str) -> None:
        self.duties.setdefault(name, []).append(duty)

    def has_role(self, name: str) -> bool:
        return any(name in members for members in self.wanted.values())


def _roles(home: str, shared: Mapping[str, Any], workers: list[Worker]) -> _Roles:
    """The pools each worker belongs in, from the shared options first (in
    their order, which is Synapse's order of stream writers), then from each
    worker's own file and name."""
    known = {worker.name for worker in workers}
    roles = _Roles()
    # Names that homeserver.yaml gives and no worker file has.
    missing: dict[str, list[str]] = {}

    def worker_names(option: str, key: KeyPath, value: object) -> list[str]:
        names = _names(home, value, key)
        for name in names:
            if name not in known and name not in MAIN_NAMES:
                missing.setdefault(name, []).append(option)
        return [name for name in names if name in known]

    writers = shared.get("stream_writers") or {}
    if not isinstance(writers, dict):
        raise MigrationError(
            home, f"expected a mapping, got {_type_name(writers)}", ("stream_writers",)
        )
    for stream, value in writers.items():
        option = f"stream_writers.{stream}"
        key = ("stream_writers", str(stream))
        names = worker_names(option, key, value)
        if stream in STREAM_POOLS:
            for name in names:
                roles.want(STREAM_POOLS[stream], name, option)
            if MAIN_NAMES & set(_names(home, value, key)):
                roles.notes.append(
                    f"{option} includes the main process, which takes these "
                    "requests through `upstream`."
                )
        elif stream == "events":
            for name in names:
                roles.duty(name, f"event persister ({option})")
            roles.notes.append(
                f"{option}: event persisters take no requests (event creators "
                "reach them over replication), so they need no pool."
            )
        elif stream == "quarantined_media_changes":
            roles.notes.append(
                f"{option}: no pool of its own; matrix-edge sends the quarantine "
                "admin API with the media_repository routes."
            )
        else:
            roles.notes.append(f"{option}: matrix-edge has no pool for it.")

    for option, duty in DUTY_OPTIONS.items():
        for name in worker_names(option, (option,), shared.get(option)):
            roles.duty(name, f"{duty} ({option})")
    media_jobs = worker_names(
        "media_instance_running_background_jobs",
        ("media_instance_running_background_jobs",),
        shared.get("media_instance_running_background_jobs"),
    )
    user_dir = worker_names(
        "update_user_directory_from_worker",
        ("update_user_directory_from_worker",),
        shared.get("update_user_directory_from_worker"),
    )
    instance_map = shared.get("instance_map") or {}
    if not isinstance(instance_map, dict):
        raise MigrationError(
            home,
            f"expected a mapping, got {_type_name(instance_map)}",
            ("instance_map",),
        )
    worker_names("instance_map", ("instance_map",), [str(k) for k in instance_map])

    for worker in workers:
        name = worker.name
        if name in media_jobs:
            roles.want(
                "media_repository", name, "media_instance_running_background_jobs"
            )
        if worker.enable_media_repo:
            roles.want("media_repository", name, "enable_media_repo: true")
        if name in user_dir:
            roles.want("user_dir", name, "update_user_directory_from_worker")
        if worker.app in APP_ROLES:
            roles.want(APP_ROLES[worker.app], name, f"worker_app {worker.app}")
        if worker.app in APP_DUTIES:
            roles.duty(name, f"{APP_DUTIES[worker.app]} (worker_app {worker.app})")
        role = _role_from_name(name)
        if role is not None:
            roles.want(role, name, "by its name")

    # Generic workers: their name says nothing, but they serve requests.
    for worker in workers:
        if roles.has_role(worker.name) or worker.name in roles.duties:
            continue
        if worker.listener_for("client") is not None:
            roles.want(
                "client_reader",
                worker.name,
                "its name matches no role, and client_reader takes the "
                "endpoints any generic worker serves",
            )
        elif worker.listener_for("federation") is not None:
            roles.want(
                "federation_reader",
                worker.name,
                "its name matches no role, and federation_reader takes the "
                "federation endpoints any generic worker serves",
            )

    if missing:
        listed = "; ".join(
            f"{name} ({', '.join(dict.fromkeys(options))})"
            for name, options in missing.items()
        )
        roles.notes.append(
            f"Named in {home} but no worker file given: {listed}. Give their "
            "files too if they take requests."
        )
    return roles


def _plan(home: str, shared: Mapping[str, Any], workers: list[Worker]) -> _Plan:
    """Which worker goes in which pool, and why; why others are in none."""
    roles = _roles(home, shared, workers)
    by_name = {worker.name: worker for worker in workers}
    plan = _Plan(notes=roles.notes)
    # worker name -> the pools it is not in, and why.
    missed: dict[str, list[str]] = {}

    for pool in sorted(roles.wanted, key=POOL_ORDER.index):
        members: list[_Member] = []
        notes: list[str] = []
        resource = _resource(pool)
        for name, why in roles.wanted[pool].items():
            worker = by_name[name]
            asked = f"{pool} ({'; '.join(why)})"
            listener = worker.listener_for(resource)
            if listener is None:
                if _public_listener(worker) is None:
                    missed.setdefault(name, []).append(asked)
                else:
                    missed.setdefault(name, []).append(
                        f"{asked}, but it has no plain HTTP listener with the "
                        f"{resource} resource"
                    )
                continue
            same = next((m for m in members if m.address == listener.address), None)
            if same is not None:
                notes.append(
                    f"{worker.label} is left out: it has the address of "
                    f"{same.worker.name}."
                )
                missed.setdefault(name, []).append(
                    f"{asked}, but it has the address of {same.worker.name}"
                )
                continue
            members.append(_Member(listener.address, worker, why, listener.note))
        if pool in SINGLE_POOLS and len(members) > 1:
            notes.append(
                f"{pool} takes exactly one process (its routes use the `single` "
                f"policy): the first is kept, and left out are "
                + "; ".join(
                    f"{m.worker.label}, {', '.join(m.why)}" for m in members[1:]
                )
                + "."
            )
            for member in members[1:]:
                missed.setdefault(member.worker.name, []).append(
                    f"{pool} ({'; '.join(member.why)}), but {pool} takes one "
                    f"process and {members[0].worker.name} comes first"
                )
            members = members[:1]
        if members:
            plan.pools[pool] = members
        if notes:
            plan.pool_notes[pool] = notes

    in_a_pool = {m.worker.name for members in plan.pools.values() for m in members}
    instance_map = shared.get("instance_map") or {}
    for worker in workers:
        if worker.name in in_a_pool:
            plan.notes += [
                f"{worker.label} is not in {text}."
                for text in missed.get(worker.name, [])
            ]
        else:
            plan.left_out.append(
                _left_out(
                    worker,
                    missed.get(worker.name, []),
                    roles.duties.get(worker.name, []),
                    worker.name in instance_map,
                )
            )

    if (
        shared.get("enable_media_repo") is False
        and "media_repository" not in plan.pools
    ):
        plan.notes.append(
            f"{home} has enable_media_repo: false, but no media repository "
            "worker is in a pool: media requests will go to the main process, "
            "which does not serve them."
        )
    return plan


def _left_out(
    worker: Worker, missed: list[str], duties: list[str], in_instance_map: bool
) -> str:
    """Why a worker is in no pool."""
    parts = []
    if _public_listener(worker) is None:
        parts.append(_no_public_listener(worker, in_instance_map))
    if missed:
        parts.append("it would be in " + "; ".join(missed))
    if duties:
        parts.append("its duties take no requests: " + ", ".join(duties))
    if not parts:
        parts.append(
            "it serves media only, but nothing makes it a media repository "
            "(worker_app synapse.app.media_repository, enable_media_repo: true "
            "or media_instance_running_background_jobs)"
        )
    return f"{worker.label}: " + "; ".join(parts) + "."


def _no_public_listener(worker: Worker, in_instance_map: bool) -> str:
    if not worker.listeners:
        return "no HTTP listener"
    if any(lst.resources & set(PUBLIC_RESOURCES) for lst in worker.listeners):
        return (
            "its listeners with the client, federation or media resource use "
            "TLS, and matrix-edge speaks plain HTTP to Synapse"
        )
    text = "no HTTP listener with the client, federation or media resource"
    if in_instance_map or any(
        "replication" in lst.resources for lst in worker.listeners
    ):
        text += (
            " (its replication listener, the one instance_map names, must "
            "never take public traffic)"
        )
    return text


def _names(path: str, value: object, key: KeyPath) -> list[str]:
    """Worker names from an option that takes one name or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(dict.fromkeys(value))
    raise MigrationError(
        path, f"expected a worker name or a list of them, got {value!r}", key
    )


def _role_from_name(name: str) -> str | None:
    """The pool a worker's name asks for: ``client-reader-2`` is a
    client_reader, ``synapse_synchrotron1`` a synchrotron."""
    base = _TRAILING_NUMBER.sub("", name).lower().replace("-", "_")
    # Longest first, so that `initial_synchrotron` is not a synchrotron.
    for known in sorted(NAME_ROLES, key=len, reverse=True):
        if base == known or base.endswith("_" + known):
            return NAME_ROLES[known]
    return None


def _resource(pool: str) -> str:
    """The listener resource a pool's requests need."""
    if pool in ("federation_inbound", "federation_reader"):
        return "federation"
    if pool == "media_repository":
        return "media"
    return "client"


def _public_listener(worker: Worker) -> Listener | None:
    for resource in PUBLIC_RESOURCES:
        listener = worker.listener_for(resource)
        if listener is not None:
            return listener
    return None


def _render(home: str, worker_files: int, main: Listener, plan: _Plan) -> str:
    files = "worker file" if worker_files == 1 else "worker files"
    lines = _comment(
        f"matrix-edge pools for the Synapse deployment of {home} and "
        f"{worker_files} {files}. Each pool takes the routes of its role in "
        "matrix-edge's shipped table (`twistd matrix-edge -c CONFIG routes` "
        "lists them); every other request goes to `upstream`. Read the "
        "comments before use."
    )
    lines.append("")
    about_main = f"Synapse's main process: {format_path(main.key)} in {home}"
    if main.note:
        about_main += f"; {main.note}"
    lines += _comment(about_main)
    lines.append(f"upstream: {_scalar(main.address)}")
    lines.append("")

    if plan.pools:
        lines += ["workers:", "  pools:"]
        for pool in POOL_ORDER:
            members = plan.pools.get(pool)
            if not members:
                continue
            for note in plan.pool_notes.get(pool, []):
                lines += _comment(note, "    ")
            lines.append(f"    {pool}:")
            for member in members:
                about = f"{member.worker.label}: {'; '.join(member.why)}"
                if member.note:
                    about += f"; {member.note}"
                lines += _comment(about, "      ")
                lines.append(f"      - {_scalar(member.address)}")
    else:
        lines += _comment(
            "No worker takes requests: leave out the `workers` section, and "
            "matrix-edge sends every request to `upstream`."
        )

    for title, texts in (("Workers in no pool:", plan.left_out), ("Also:", plan.notes)):
        if texts:
            lines.append("")
            lines += _comment(title)
            for text in texts:
                lines += _comment(text, bullet=True)
    return "\n".join(lines) + "\n"


def _comment(text: str, indent: str = "", bullet: bool = False) -> list[str]:
    """``text`` as wrapped YAML comment lines."""
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return textwrap.wrap(
        printable,
        width=COMMENT_WIDTH,
        initial_indent=f"{indent}# - " if bullet else f"{indent}# ",
        subsequent_indent=f"{indent}#   " if bullet else f"{indent}# ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _scalar(text: str) -> str:
    """``text`` as a YAML scalar: plain when it reads back the same."""
    try:
        if yaml.safe_load(f"- {text}") == [text]:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(text)

"""Matrix clients for the suite, made with matrix-nio, driven over stdin.

Runs in the suite's own virtualenv (nio is asyncio and aiohttp; the tests run
on Twisted). Each line on stdin is a JSON command
``{"id": N, "op": NAME, "args": {...}}``; each answer is one JSON line on
stdout: ``{"id": N, "ok": true, "result": ...}`` or ``{"id": N, "ok": false,
"error": ..., "errcode": ..., "status": ...}`` when the homeserver refused.
Logging goes to stderr.

Every client reaches its homeserver the way a real one does: it reads
``https://<server name>/.well-known/matrix/client`` and uses the base URL it
names, trusting only the suite's CA. Each client connects from its own
loopback address, so the tests can check which address Synapse recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import ssl
import sys
import time
import traceback
from typing import Any

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    DiscoveryInfoResponse,
    ErrorResponse,
    RoomCreateResponse,
)


class Refused(Exception):
    """The homeserver answered with an error."""

    def __init__(self, what: str, response: Any):
        transport = getattr(response, "transport_response", None)
        self.status = getattr(transport, "status", None)
        if isinstance(response, ErrorResponse):
            self.errcode = response.status_code
            self.message = response.message
        else:
            self.errcode = None
            self.message = f"HTTP {self.status} from {getattr(transport, 'url', '?')}"
        super().__init__(f"{what}: {self.status} {self.errcode} {self.message}")


def check(what: str, response: Any) -> Any:
    """``response`` if the homeserver accepted the request. Some nio response
    classes parse an error body as success, so the HTTP status counts too."""
    transport = getattr(response, "transport_response", None)
    status = getattr(transport, "status", None)
    if isinstance(response, ErrorResponse) or (status and status >= 400):
        raise Refused(what, response)
    return response


class Driver:
    def __init__(self, ca_file: str):
        self.ssl = ssl.create_default_context(cafile=ca_file)
        self.clients: dict[str, AsyncClient] = {}
        self.sync_sent: dict[str, asyncio.Event] = {}
        self.since: dict[str, str] = {}
        self.polls: dict[str, asyncio.Task] = {}

    def session(self, name: str, source_ip: str) -> aiohttp.ClientSession:
        sent = self.sync_sent.setdefault(name, asyncio.Event())

        async def on_headers_sent(session: Any, context: Any, params: Any) -> None:
            if params.url.path.endswith("/sync"):
                sent.set()

        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(on_headers_sent)
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl, local_addr=(source_ip, 0)),
            trace_configs=[trace],
            timeout=aiohttp.ClientTimeout(total=None),
        )

    # -- operations ------------------------------------------------------

    async def op_login(
        self, name: str, server_name: str, user: str, password: str, source_ip: str
    ) -> dict:
        config = AsyncClientConfig(
            max_limit_exceeded=0, max_timeouts=0, request_timeout=120
        )
        client = AsyncClient(f"https://{server_name}", user, config=config)
        client.ssl = self.ssl
        client.client_session = self.session(name, source_ip)
        discovery = check("discovery", await client.discovery_info())
        assert isinstance(discovery, DiscoveryInfoResponse)
        client.homeserver = discovery.homeserver_url.rstrip("/")
        login = check("login", await client.login(password, device_name=name))
        self.clients[name] = client
        return {
            "user_id": login.user_id,
            "device_id": login.device_id,
            "base_url": client.homeserver,
        }

    async def op_create_room(
        self,
        name: str,
        alias_localpart: str | None = None,
        invite: list[str] = (),
        public: bool = False,
    ) -> dict:
        from nio import RoomPreset, RoomVisibility

        response = check(
            "createRoom",
            await self.clients[name].room_create(
                alias=alias_localpart,
                invite=list(invite),
                visibility=RoomVisibility.public if public else RoomVisibility.private,
                preset=RoomPreset.public_chat if public else RoomPreset.private_chat,
            ),
        )
        assert isinstance(response, RoomCreateResponse)
        return {"room_id": response.room_id}

    async def op_put_alias(self, name: str, alias: str, room_id: str) -> dict:
        check("put alias", await self.clients[name].room_put_alias(alias, room_id))
        return {}

    async def op_resolve_alias(self, name: str, alias: str) -> dict:
        response = check(
            "resolve alias", await self.clients[name].room_resolve_alias(alias)
        )
        return {"room_id": response.room_id, "servers": response.servers}

    async def op_put_state(
        self,
        name: str,
        room_id: str,
        event_type: str,
        state_key: str,
        content: dict,
    ) -> dict:
        response = check(
            "put state",
            await self.clients[name].room_put_state(
                room_id, event_type, content, state_key=state_key
            ),
        )
        return {"event_id": response.event_id}

    async def op_get_state(
        self, name: str, room_id: str, event_type: str, state_key: str
    ) -> dict:
        response = check(
            "get state",
            await self.clients[name].room_get_state_event(
                room_id, event_type, state_key
            ),
        )
        return {"content": response.content}

    async def op_invite(self, name: str, room_id: str, user_id: str) -> dict:
        check("invite", await self.clients[name].room_invite(room_id, user_id))
        return {}

    async def op_join(self, name: str, room: str) -> dict:
        response = check("join", await self.clients[name].join(room))
        return {"room_id": response.room_id}

    async def op_wait_for_invite(self, name: str, room_id: str, within: float) -> dict:
        """Sync until the invite to ``room_id`` has arrived."""
        client = self.clients[name]
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            response = check(
                "sync",
                await client.sync(timeout=5000, since=self.since.get(name)),
            )
            self.since[name] = response.next_batch
            if room_id in response.rooms.invite:
                return {}
        raise TimeoutError(f"no invite to {room_id} within {within}s")

    async def op_members(self, name: str, room_id: str) -> dict:
        response = check(
            "joined members", await self.clients[name].joined_members(room_id)
        )
        return {"user_ids": sorted(m.user_id for m in response.members)}

    async def op_start_long_poll(self, name: str) -> dict:
        """Catch up, then park a /sync long-poll; answer once its request is
        on the wire, so that what is sent next arrives while it waits."""
        client = self.clients[name]
        response = check(
            "catch-up sync", await client.sync(timeout=0, since=self.since.get(name))
        )
        self.since[name] = response.next_batch
        sent = self.sync_sent[name]
        sent.clear()
        self.polls[name] = asyncio.ensure_future(
            client.sync(timeout=30000, since=self.since[name])
        )
        await sent.wait()
        return {"since": self.since[name]}

    async def op_finish_long_poll(
        self, name: str, room_id: str, body: str, within: float
    ) -> dict:
        """Wait for the message ``body`` in ``room_id``: on the parked
        long-poll first, then on follow-up long-polls if that one woke for
        something else."""
        client = self.clients[name]
        poll = self.polls.pop(name)
        deadline = time.monotonic() + within
        answers = 0
        while True:
            response = check(
                "long-poll sync",
                await asyncio.wait_for(poll, max(0.1, deadline - time.monotonic())),
            )
            answers += 1
            self.since[name] = response.next_batch
            room = response.rooms.join.get(room_id)
            for event in room.timeline.events if room else ():
                if getattr(event, "body", None) == body:
                    return {
                        "event_id": event.event_id,
                        "sender": event.sender,
                        "long_polls": answers,
                    }
            if time.monotonic() > deadline:
                raise TimeoutError(f"{body!r} not seen in {room_id} in {within}s")
            poll = asyncio.ensure_future(
                client.sync(timeout=30000, since=self.since[name])
            )

    async def op_send_message(self, name: str, room_id: str, body: str) -> dict:
        response = check(
            "send",
            await self.clients[name].room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": body}
            ),
        )
        return {"event_id": response.event_id}

    async def op_upload(self, name: str, size: int, filename: str) -> dict:
        data = os.urandom(size)
        response, _ = await self.clients[name].upload(
            lambda *_: data,
            content_type="application/octet-stream",
            filename=filename,
            filesize=size,
        )
        check("upload", response)
        return {
            "mxc": response.content_uri,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": size,
        }

    async def op_download(self, name: str, mxc: str) -> dict:
        response = check("download", await self.clients[name].download(mxc))
        return {
            "sha256": hashlib.sha256(response.body).hexdigest(),
            "size": len(response.body),
            "content_type": response.content_type,
            "filename": response.filename,
        }

    async def op_devices(self, name: str) -> dict:
        response = check("devices", await self.clients[name].devices())
        return {
            "devices": [
                {
                    "device_id": d.id,
                    "display_name": d.display_name,
                    "last_seen_ip": d.last_seen_ip,
                }
                for d in response.devices
            ]
        }

    async def op_access_token(self, name: str) -> dict:
        return {"access_token": self.clients[name].access_token}

    async def close(self) -> None:
        for poll in self.polls.values():
            poll.cancel()
        for client in self.clients.values():
            await client.close()


async def serve(driver: Driver) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    out = sys.stdout
    while line := await reader.readline():
        command = json.loads(line)
        answer: dict[str, Any] = {"id": command["id"]}
        try:
            operation = getattr(driver, "op_" + command["op"])
            answer["result"] = await operation(**command.get("args", {}))
            answer["ok"] = True
        except Refused as e:
            answer.update(
                ok=False,
                error=str(e),
                errcode=e.errcode,
                status=e.status,
                message=e.message,
            )
        except Exception as e:
            traceback.print_exc()
            answer.update(ok=False, error=f"{type(e).__name__}: {e}")
        out.write(json.dumps(answer) + "\n")
        out.flush()
    await driver.close()


def main() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(serve(Driver(ca_file=sys.argv[1])))


if __name__ == "__main__":
    main()

"""A deliberately wrong reverse proxy, for the suite only: it %xx-decodes the
path of every request before passing it on, as nginx does when
``proxy_pass http://synapse/;`` carries a path, or Apache without
``nocanon``. Characters that cannot stand raw in a request line (space,
``#``, ``?``, ``%``, controls, non-ASCII) are escaped again, as nginx does;
everything else, ``/ ! $ : @`` included, goes on decoded. The query string
is left alone.

Put between matrix-edge and Synapse, it must make federation fail at
Synapse's signature check, which covers the request target byte for byte.

Usage: decoding_shim.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT REQUEST_LOG

One request per connection: the request goes upstream with
``Connection: close`` and the connection ends with the response, so no HTTP
framing needs to be understood beyond the request head.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from urllib.parse import quote, unquote_to_bytes

# RFC 3986 reserved and unreserved characters that may stand raw in a path.
_RAW_OK = "/!$&'()*+,;=:@-._~"


def canonicalise(target: bytes) -> bytes:
    path, sep, query = target.partition(b"?")
    decoded = unquote_to_bytes(path)
    return quote(decoded, safe=_RAW_OK).encode("ascii") + sep + query


def rewrite_head(head: bytes) -> tuple[bytes, bytes, bytes]:
    """Return the new head, and the old and new request targets."""
    lines = head.split(b"\r\n")
    method, target, version = lines[0].split(b" ", 2)
    new_target = canonicalise(target)
    headers = [
        line
        for line in lines[1:]
        if line and line.split(b":", 1)[0].strip().lower() != b"connection"
    ]
    headers.append(b"Connection: close")
    new_head = b"\r\n".join([b" ".join((method, new_target, version)), *headers])
    return new_head + b"\r\n\r\n", target, new_target


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()


async def handle(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream: tuple[str, int],
    log,
) -> None:
    try:
        head = await client_reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        client_writer.close()
        return
    new_head, old_target, new_target = rewrite_head(head[:-4])
    log.write(f"{old_target.decode('latin-1')} -> {new_target.decode('latin-1')}\n")
    log.flush()
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.write(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n"
        )
        client_writer.close()
        return
    up_writer.write(new_head)
    request_body = asyncio.ensure_future(pipe(client_reader, up_writer))
    await pipe(up_reader, client_writer)
    request_body.cancel()
    up_writer.close()
    client_writer.close()


async def main() -> None:
    listen_host, listen_port = sys.argv[1].rsplit(":", 1)
    up_host, up_port = sys.argv[2].rsplit(":", 1)
    log = open(sys.argv[3], "a")  # noqa: SIM115
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, (up_host, int(up_port)), log),
        listen_host,
        int(listen_port),
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

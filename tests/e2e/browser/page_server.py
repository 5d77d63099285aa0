"""The browser test's page origin: serves a folder on 127.0.0.1 and stores
what the page posts to ``/result``.

Usage: page_server.py SITE_DIR PORT_FILE RESULT_FILE

It listens on a free port, which it writes to PORT_FILE once it accepts
connections. Each POST to /result replaces RESULT_FILE (written to a side
file and renamed, so a reader never sees half of one). 127.0.0.1 is a
secure context for the browser, and another origin than the homeserver's.
"""

from __future__ import annotations

import functools
import os
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_RESULT_BYTES = 1 << 20


class Handler(SimpleHTTPRequestHandler):
    result_file: Path

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.path != "/result" or not 0 < length <= MAX_RESULT_BYTES:
            self.send_error(400)
            return
        body = self.rfile.read(length)
        partial = self.result_file.with_suffix(".partial")
        partial.write_bytes(body)
        os.replace(partial, self.result_file)
        self.send_response(204)
        self.end_headers()


def main(site: str, port_file: str, result_file: str) -> None:
    Handler.result_file = Path(result_file)
    handler = functools.partial(Handler, directory=site)
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        Path(port_file).write_text(str(server.server_address[1]))
        server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:])

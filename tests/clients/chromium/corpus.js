// Sends the HTTP/2 request corpus of test_h2_corpus_chromium.py with
// fetch(), from another origin than the edge's, and posts what came back
// to the page's own server.
//
// /config.json lists groups of requests: the groups go one after another,
// the requests of a group all at once. A body is text, a repeating byte
// pattern (bytes 0..255 over and over) sent as an ArrayBuffer, or the same
// pattern in chunks from a ReadableStream (no content-length).

const REQUEST_TIMEOUT_MS = 20_000;

function pattern(size) {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = i & 255;
  return bytes;
}

function body(spec) {
  if (spec === null) return {};
  if (spec.kind === "text") return { body: spec.text };
  if (spec.kind === "pattern") return { body: pattern(spec.size).buffer };
  const chunks = spec.chunks.slice();
  const stream = new ReadableStream({
    pull(controller) {
      if (chunks.length) controller.enqueue(pattern(chunks.shift()));
      else controller.close();
    },
  });
  return { body: stream, duplex: "half" };
}

async function send(edge, request) {
  const entry = { method: request.method, target: request.target };
  try {
    const response = await fetch(edge + request.target, {
      method: request.method,
      headers: request.headers,
      credentials: request.credentials,
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      ...body(request.body),
    });
    entry.status = response.status;
    entry.body = await response.text();
  } catch (error) {
    entry.error = String(error?.message ?? error);
  }
  return entry;
}

async function main() {
  const config = await (await fetch("/config.json")).json();
  const results = [];
  for (const group of config.groups) {
    results.push(...(await Promise.all(group.map((r) => send(config.edge, r)))));
  }
  await fetch("/result", {
    method: "POST",
    body: JSON.stringify({ done: true, results }),
  });
}

main().catch((error) =>
  fetch("/result", {
    method: "POST",
    body: JSON.stringify({ done: true, failed: String(error?.stack ?? error) }),
  }),
);

// Sends HTTP/2 requests with node:http2 on one connection and reports what
// came back. Reads a JSON job on stdin:
//   {port, servername, parallel, requests: [{method, target, authority,
//    headers: [[name, value], ...], body: null | base64}]}
// and writes {alpn, results: [{status, headers, body_base64, error}]}.
// Repeated names become one array value at the first name's position,
// which is how node:http2 takes them.
import http2 from "node:http2";

function readStdin() {
  return new Promise((resolve, reject) => {
    const parts = [];
    process.stdin.on("data", (d) => parts.push(d));
    process.stdin.on("end", () => resolve(Buffer.concat(parts).toString()));
    process.stdin.on("error", reject);
  });
}

function headerObject(request) {
  const out = {
    ":method": request.method,
    ":path": request.target,
    ":scheme": "https",
    ":authority": request.authority,
  };
  for (const [name, value] of request.headers) {
    if (name in out) {
      out[name] = [].concat(out[name], value);
    } else {
      out[name] = value;
    }
  }
  return out;
}

function send(session, request) {
  return new Promise((resolve) => {
    const noBody = request.body === null;
    const stream = session.request(headerObject(request), { endStream: noBody });
    const chunks = [];
    let headers = [];
    stream.on("response", (h, flags, raw) => {
      headers = [];
      for (let i = 0; i < raw.length; i += 2) headers.push([raw[i], raw[i + 1]]);
    });
    stream.on("data", (d) => chunks.push(d));
    stream.on("end", () => {
      const status = Number(headers.find(([k]) => k === ":status")?.[1] ?? 0);
      resolve({
        status,
        headers,
        body_base64: Buffer.concat(chunks).toString("base64"),
        error: null,
      });
    });
    stream.on("error", (e) =>
      resolve({ status: 0, headers, body_base64: "", error: String(e) }),
    );
    if (!noBody) stream.end(Buffer.from(request.body, "base64"));
  });
}

async function main() {
  const job = JSON.parse(await readStdin());
  const session = http2.connect(`https://127.0.0.1:${job.port}`, {
    servername: job.servername,
    rejectUnauthorized: false,
    // As many concurrent streams as the job asks for.
    peerMaxConcurrentStreams: 1000,
  });
  session.on("error", (e) => {
    process.stdout.write(JSON.stringify({ alpn: null, fatal: String(e), results: [] }));
    process.exit(0);
  });
  await new Promise((resolve) => session.once("connect", resolve));
  const results = [];
  if (job.parallel) {
    results.push(...(await Promise.all(job.requests.map((r) => send(session, r)))));
  } else {
    for (const r of job.requests) results.push(await send(session, r));
  }
  const alpn = session.alpnProtocol;
  session.close();
  process.stdout.write(JSON.stringify({ alpn, results }));
}

main();

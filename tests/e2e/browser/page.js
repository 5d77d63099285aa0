// What a browser-based Matrix client does, run by test_e2e_browser.py in
// headless Chromium with matrix-js-sdk. The page comes from another origin
// than the homeserver, so the requests that carry an access token or a JSON
// body are preceded by CORS preflights, as for Element Web.
//
// Each step is recorded; the record is posted to the page's own server
// after every step, and once more with `done: true` at the end, so a step
// that hangs still leaves the ones before it on record.

import { ClientEvent, Direction, RoomEvent, SyncState, createClient } from "matrix-js-sdk";

const params = new URLSearchParams(location.hash.slice(1));
const baseUrl = params.get("homeserver");
const user = params.get("user");
const password = params.get("password");

const STEP_TIMEOUT_MS = 60_000;
const MEDIA_BYTES = 3 * 1024 * 1024;
const MESSAGES = ["first message", "second message", "third message"];

const record = { done: false, steps: [] };

async function report() {
  await fetch("/result", { method: "POST", body: JSON.stringify(record) });
}

async function step(name, run) {
  const started = performance.now();
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${STEP_TIMEOUT_MS} ms`)), STEP_TIMEOUT_MS);
  });
  const entry = { name };
  record.steps.push(entry);
  try {
    entry.detail = await Promise.race([run(), timeout]);
    entry.ok = true;
    return entry.detail;
  } catch (error) {
    entry.ok = false;
    entry.error = {
      message: String(error?.message ?? error),
      errcode: error?.errcode,
      httpStatus: error?.httpStatus,
    };
    throw error;
  } finally {
    clearTimeout(timer);
    entry.ms = Math.round(performance.now() - started);
    await report();
  }
}

async function logIn(deviceName) {
  let client;
  await step(`log in ${deviceName}`, async () => {
    const response = await createClient({ baseUrl }).loginRequest({
      type: "m.login.password",
      identifier: { type: "m.id.user", user },
      password,
      initial_device_display_name: deviceName,
    });
    client = createClient({
      baseUrl,
      userId: response.user_id,
      deviceId: response.device_id,
      accessToken: response.access_token,
    });
    return { userId: response.user_id, deviceId: response.device_id };
  });
  return client;
}

function syncReaches(client, state) {
  return new Promise((resolve, reject) => {
    client.on(ClientEvent.Sync, (now, _previous, data) => {
      if (now === state) resolve();
      if (now === SyncState.Error) reject(data?.error ?? new Error("sync failed"));
    });
  });
}

function messageArrives(client, roomId, body) {
  return new Promise((resolve) => {
    const listener = (event, room) => {
      if (room?.roomId === roomId && event.getContent().body === body) {
        client.off(RoomEvent.Timeline, listener);
        resolve();
      }
    };
    client.on(RoomEvent.Timeline, listener);
  });
}

async function sha256(buffer) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", buffer));
  return Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function randomBytes(length) {
  const bytes = new Uint8Array(length);
  // getRandomValues fills at most 64 KiB at a time.
  for (let offset = 0; offset < length; offset += 65536) {
    crypto.getRandomValues(bytes.subarray(offset, offset + 65536));
  }
  return bytes;
}

async function scenario() {
  await step("versions", async () => {
    const response = await fetch(`${baseUrl}/_matrix/client/versions`);
    if (!response.ok) throw new Error(`GET /versions: ${response.status}`);
    return (await response.json()).versions.length;
  });

  // Two sessions of one user: the writer acts, the reader only syncs.
  const writer = await logIn("browser writer");
  const reader = await logIn("browser reader");
  await step("whoami", async () => (await writer.whoami()).user_id);

  const roomId = await step("create room", async () => {
    const { room_id } = await writer.createRoom({ name: "browser test" });
    return room_id;
  });

  await step("start the reader's sync", async () => {
    const prepared = syncReaches(reader, SyncState.Prepared);
    await reader.startClient({ initialSyncLimit: 10 });
    await prepared;
  });

  await step("message wakes the reader's sync", async () => {
    // Let the reader's next /sync reach the server and wait there.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const arrived = messageArrives(reader, roomId, MESSAGES[0]);
    const sent = performance.now();
    await writer.sendMessage(roomId, { msgtype: "m.text", body: MESSAGES[0] });
    await arrived;
    return { arrivedAfterMs: Math.round(performance.now() - sent) };
  });

  await step("send more messages", async () => {
    for (const body of MESSAGES.slice(1)) {
      await writer.sendMessage(roomId, { msgtype: "m.text", body });
    }
  });

  await step("read messages back", async () => {
    const { chunk } = await writer.createMessagesRequest(roomId, null, 20, Direction.Forward);
    const bodies = chunk.filter((event) => event.type === "m.room.message").map((event) => event.content.body);
    if (JSON.stringify(bodies) !== JSON.stringify(MESSAGES)) {
      throw new Error(`read back ${JSON.stringify(bodies)}`);
    }
    return bodies;
  });

  const media = randomBytes(MEDIA_BYTES);
  const mxc = await step("upload media", async () => {
    const blob = new Blob([media], { type: "application/octet-stream" });
    const { content_uri } = await writer.uploadContent(blob, { name: "random.bin" });
    return content_uri;
  });

  await step("download media", async () => {
    const url = writer.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, true);
    const response = await fetch(url, {
      headers: { Authorization: `Bearer ${writer.getAccessToken()}` },
    });
    if (!response.ok) throw new Error(`GET ${url}: ${response.status} ${await response.text()}`);
    const body = await response.arrayBuffer();
    const [sent, received] = [await sha256(media), await sha256(body)];
    if (sent !== received) throw new Error(`SHA-256 ${received} (${body.byteLength} bytes), sent ${sent}`);
    return { path: new URL(url).pathname, bytes: body.byteLength, sha256: received };
  });

  reader.stopClient();
}

scenario()
  .catch((error) => console.error("browser scenario failed:", error))
  .finally(async () => {
    record.done = true;
    await report();
  });

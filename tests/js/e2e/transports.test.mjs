// Server-Sent Events and long polling on the wire, as ASP.NET Core answers them: the
// status codes of every transport request, the SSE framing, one receive request per
// connection, the poll timeout, and disposal of a connection whose receive request is
// gone. Raw HTTP (node:http), not the client, so every answer is seen as sent. Two
// shards: negotiate spreads sessions over them, so requests are handed between shards.
import { after, before, describe, test } from "node:test";
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";
import http from "node:http";
import { connect, connectionsPerShard, raw, sleep, startServer, statusOf, token, until, upgradeRequest } from "./helpers.mjs";

const API_KEY = "transport-key";
const SECRET = "test-secret";
const RS = "\u001e";
let server;
let authServer;

before(async () => {
  server = await startServer(["--threads", "2", "--api-key", API_KEY, "--long-poll-timeout-secs", "1", "--disconnect-timeout-secs", "1"]);
  authServer = await startServer(["--threads", "2", "--jwt-secret", SECRET]);
});
after(async () => {
  strictEqual(await server.stop(), 0);
  strictEqual(await authServer.stop(), 0);
});

/** One HTTP request on its own connection; resolves with status, headers and body. */
function request(base, method, path, { headers = {}, body } = {}) {
  if (body !== undefined) headers = { ...headers, "Content-Length": Buffer.byteLength(body) };
  return new Promise((resolve, reject) => {
    const req = http.request(`${base}${path}`, { method, headers, agent: false }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
    });
    req.on("error", reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

async function negotiate(base, headers = {}) {
  const res = await request(base, "POST", "/hubs/chat/negotiate?negotiateVersion=1", { headers });
  strictEqual(res.status, 200);
  return JSON.parse(res.body);
}

const post = (base, id, body, headers = {}) => request(base, "POST", `/hubs/chat?id=${id}`, { headers: { "Content-Type": "text/plain;charset=UTF-8", ...headers }, body });
const poll = (base, id, headers = {}) => request(base, "GET", `/hubs/chat?id=${id}&_=${Date.now()}`, { headers });

/** An open event stream: its status and headers, and everything received so far. */
function openEventStream(base, id, query = "") {
  return new Promise((resolve, reject) => {
    const req = http.get(`${base}/hubs/chat?id=${id}${query}`, { headers: { Accept: "text/event-stream" }, agent: false }, (res) => {
      const stream = { status: res.statusCode, headers: res.headers, text: "", ended: false, close: () => req.destroy() };
      res.on("data", (c) => (stream.text += c));
      res.on("end", () => (stream.ended = true));
      res.on("error", () => (stream.ended = true));
      resolve(stream);
    });
    req.on("error", reject);
  });
}

describe("Server-Sent Events", () => {
  test("the stream: headers, the opening comment, one data: event per message", async () => {
    const { connectionToken } = await negotiate(server.base);
    const stream = await openEventStream(server.base, connectionToken);
    strictEqual(stream.status, 200);
    strictEqual(stream.headers["content-type"], "text/event-stream");
    strictEqual(stream.headers["cache-control"], "no-cache,no-store");
    await until(() => stream.text.startsWith(":\r\n"), 2000, "the opening comment");
    strictEqual((await post(server.base, connectionToken, `{"protocol":"json","version":1}${RS}`)).status, 200);
    await until(() => stream.text.includes(`data: {}${RS}\r\n\r\n`), 2000, "the handshake answer as an event");
    strictEqual((await post(server.base, connectionToken, `{"type":1,"invocationId":"7","target":"Echo","arguments":["hi"]}${RS}`)).status, 200);
    await until(() => stream.text.includes(`data: {"type":3,"invocationId":"7","result":"hi"}${RS}\r\n\r\n`), 2000, "the completion event");
    stream.close();
  });

  test("a second event stream for the same connection is a conflict; unknown and missing ids are refused", async () => {
    const { connectionToken } = await negotiate(server.base);
    const first = await openEventStream(server.base, connectionToken);
    strictEqual(first.status, 200);
    const second = await openEventStream(server.base, connectionToken);
    strictEqual(second.status, 409);
    strictEqual((await openEventStream(server.base, "00nonexistent")).status, 404);
    strictEqual((await openEventStream(server.base, "")).status, 404);
    strictEqual((await request(server.base, "GET", "/hubs/chat", { headers: { Accept: "text/event-stream" } })).status, 400);
    strictEqual((await post(server.base, "00nonexistent", "x")).status, 404);
    first.close();
    // The stream ended: the connection is disposed and its token forgotten.
    let status;
    for (let i = 0; i < 50 && status !== 404; i++) {
      await sleep(20);
      status = (await post(server.base, connectionToken, `{"type":6}${RS}`)).status;
    }
    strictEqual(status, 404);
  });

  test("MessagePack is refused over SSE with the reference server's handshake error", async () => {
    const { connectionToken } = await negotiate(server.base);
    const stream = await openEventStream(server.base, connectionToken);
    await post(server.base, connectionToken, `{"protocol":"messagepack","version":1}${RS}`);
    await until(() => stream.ended, 2000, "the stream to end");
    ok(stream.text.includes("does not support 'Binary' transfer format"), stream.text);
  });
});

describe("long polling", () => {
  test("first poll empty, the handshake answer on the next, and messages batched into one answer", async () => {
    const { connectionToken } = await negotiate(server.base);
    const first = await poll(server.base, connectionToken);
    strictEqual(first.status, 200);
    strictEqual(first.body, "");
    strictEqual(first.headers["cache-control"], "no-cache, no-store");
    strictEqual((await post(server.base, connectionToken, `{"protocol":"json","version":1}${RS}`)).status, 200);
    strictEqual((await poll(server.base, connectionToken)).body, `{}${RS}`);
    await post(server.base, connectionToken, `{"type":1,"invocationId":"1","target":"Echo","arguments":[1]}${RS}{"type":1,"invocationId":"2","target":"Echo","arguments":[2]}${RS}`);
    strictEqual((await poll(server.base, connectionToken)).body, `{"type":3,"invocationId":"1","result":1}${RS}{"type":3,"invocationId":"2","result":2}${RS}`);
  });

  test("an empty 200 after the poll timeout; a newer poll ends the pending one with 204; DELETE ends the connection", async () => {
    const { connectionToken } = await negotiate(server.base);
    await poll(server.base, connectionToken);
    await post(server.base, connectionToken, `{"protocol":"json","version":1}${RS}`);
    await poll(server.base, connectionToken);
    const started = Date.now();
    const empty = await poll(server.base, connectionToken);
    strictEqual(empty.status, 200);
    strictEqual(empty.body, "");
    ok(Date.now() - started >= 900, "answered after --long-poll-timeout-secs");
    const pending = poll(server.base, connectionToken);
    await sleep(200);
    const newer = poll(server.base, connectionToken);
    strictEqual((await pending).status, 204, "the newer poll took over");
    await sleep(100);
    strictEqual((await request(server.base, "DELETE", `/hubs/chat?id=${connectionToken}`)).status, 202);
    strictEqual((await newer).status, 204, "the pending poll ends with the connection");
    strictEqual((await poll(server.base, connectionToken)).status, 404);
    strictEqual((await request(server.base, "DELETE", `/hubs/chat?id=${connectionToken}`)).status, 404);
  });

  test("a connection without a poll for the disconnect timeout leaves its groups and is forgotten", async () => {
    const { connectionToken, connectionId } = await negotiate(server.base);
    await poll(server.base, connectionToken);
    await post(server.base, connectionToken, `{"protocol":"json","version":1}${RS}{"type":1,"invocationId":"1","target":"JoinGroup","arguments":["lp-room"]}${RS}`);
    strictEqual((await poll(server.base, connectionToken)).body, `{}${RS}{"type":3,"invocationId":"1","result":null}${RS}`);
    const group = async () => JSON.parse((await request(server.base, "GET", "/api/hubs/chat/groups/lp-room", { headers: { Authorization: `Bearer ${API_KEY}` } })).body);
    strictEqual((await group()).connections, 1);
    const userAnswer = await request(server.base, "POST", `/api/hubs/chat/connections/${connectionId}/messages`, {
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify({ target: "receive", arguments: ["queued"] }),
    });
    strictEqual(userAnswer.status, 202, "a REST send reaches a long-polling connection");
    strictEqual((await poll(server.base, connectionToken)).body, `{"type":1,"target":"receive","arguments":["queued"]}${RS}`);
    // No poll from now on: disposed after --disconnect-timeout-secs (1 s; checked each second).
    const since = Date.now();
    let counts = await group();
    while (counts.connections !== 0 && Date.now() - since < 5000) {
      await sleep(100);
      counts = await group();
    }
    strictEqual(counts.connections, 0);
    ok(Date.now() - since >= 900, "not before the disconnect timeout");
    strictEqual((await poll(server.base, connectionToken)).status, 404);
  });
});

describe("tokens and users", () => {
  test("a token is usable only by the user who negotiated it (403), and its access token is checked (401)", async () => {
    const ann = token({ sub: "ann" });
    const bob = token({ sub: "bob" });
    const { connectionToken } = await negotiate(authServer.base, { Authorization: `Bearer ${ann}` });
    strictEqual((await openEventStream(authServer.base, connectionToken, `&access_token=${bob}`)).status, 403);
    strictEqual((await poll(authServer.base, connectionToken, { Authorization: `Bearer ${bob}` })).status, 403);
    strictEqual((await poll(authServer.base, connectionToken)).status, 401);
    strictEqual(statusOf(await raw(authServer.base, upgradeRequest(`/hubs/chat?id=${connectionToken}&access_token=${bob}`))), 403);
    const stream = await openEventStream(authServer.base, connectionToken, `&access_token=${ann}`);
    strictEqual(stream.status, 200, "the SSE stream takes the token from the query");
    strictEqual((await post(authServer.base, connectionToken, `{"protocol":"json","version":1}${RS}`, { Authorization: `Bearer ${bob}` })).status, 403);
    strictEqual((await post(authServer.base, connectionToken, `{"protocol":"json","version":1}${RS}`, { Authorization: `Bearer ${ann}` })).status, 200);
    stream.close();
  });

  test("POST and DELETE on a WebSocket connection are refused", async () => {
    const { connectionToken } = await negotiate(server.base);
    const { createConnection } = await import("node:net");
    const { hostname, port } = new URL(server.base);
    const socket = createConnection({ host: hostname, port: Number(port) });
    const answered = new Promise((resolve) => socket.once("data", resolve));
    socket.write(upgradeRequest(`/hubs/chat?id=${connectionToken}`));
    strictEqual(statusOf(await answered), 101);
    strictEqual((await post(server.base, connectionToken, "x")).status, 405);
    strictEqual((await poll(server.base, connectionToken)).status, 400, "no change of transport");
    socket.destroy();
  });
});

describe("a group of mixed transports", () => {
  test("WebSocket, SSE and long-polling members each get every send once, in order", async () => {
    const members = [];
    for (const transport of [1, 2, 4]) members.push(await connect(server.base, { transport }));
    const msgpackPolling = await connect(server.base, { transport: 4, msgpack: true });
    members.push(msgpackPolling);
    for (const m of members) await m.invoke("JoinGroup", "mixed-transports");
    ok((await connectionsPerShard(server.base)).every((n) => n > 0), "members on both shards");
    // Each send completes before the next starts, from a member of each transport in turn.
    for (let i = 0; i < 50; i++) await members[i % members.length].invoke("SendToGroup", "mixed-transports", "receive", [i]);
    await until(() => members.every((m) => m.received.length >= 50), 10000, "every member got 50");
    await sleep(200);
    for (const m of members) deepStrictEqual(m.received.map(([i]) => i), [...Array(50).keys()]);
    await Promise.all(members.map((m) => m.stop()));
  });
});

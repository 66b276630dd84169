// Stateful reconnect (contract section 10, signalr-protocol.md section 7) with the stock
// client's withStatefulReconnect(), through a TCP proxy that cuts its connections: the
// connection resumes with its id, its groups and every message sent meanwhile; past
// the replay buffer it comes back as a new connection; a resume is authorized again.
import { test } from "node:test";
import { deepStrictEqual, notStrictEqual, ok, strictEqual } from "node:assert/strict";
import { createServer, createConnection } from "node:net";
import { HubConnectionBuilder, HttpTransportType, HubConnectionState, LogLevel } from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";
import { ONCE, connect, metric, sleep, startServer, token, until } from "./helpers.mjs";

/** A TCP proxy in front of `base`; `cut()` drops every connection through it (both
 *  ends, no close frame), and connections opened within `holdMs` after a cut wait that
 *  long before they reach the server (the client's reconnect lands in the gap). */
async function proxy(base) {
  const { hostname, port } = new URL(base);
  const pairs = new Set();
  let holdUntil = 0;
  const server = createServer((client) => {
    client.on("error", () => {});
    client.pause();
    const wait = Math.max(0, holdUntil - Date.now());
    setTimeout(() => {
      const upstream = createConnection({ host: hostname, port: Number(port) });
      upstream.on("error", () => {});
      const pair = { client, upstream };
      pairs.add(pair);
      const end = () => {
        pairs.delete(pair);
        client.destroy();
        upstream.destroy();
      };
      client.on("close", end);
      upstream.on("close", end);
      client.pipe(upstream);
      upstream.pipe(client);
      client.resume();
    }, wait);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    cut(holdMs = 0) {
      holdUntil = Date.now() + holdMs;
      for (const { client, upstream } of pairs) {
        client.resetAndDestroy();
        upstream.resetAndDestroy();
      }
      pairs.clear();
    },
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/** A stateful-reconnect client (WebSockets) recording `m(...)` calls. */
async function statefulClient(base, { msgpack = false, accessToken, automaticReconnect = false } = {}) {
  const options = { transport: HttpTransportType.WebSockets };
  if (accessToken) options.accessTokenFactory = accessToken;
  let builder = new HubConnectionBuilder().withUrl(`${base}/hubs/chat`, options).withStatefulReconnect().configureLogging(LogLevel.None);
  if (msgpack) builder = builder.withHubProtocol(new MessagePackHubProtocol());
  if (automaticReconnect) builder = builder.withAutomaticReconnect([0, 0, 0]);
  const connection = builder.build();
  connection.got = [];
  connection.on("m", (value) => connection.got.push(value));
  connection.events = [];
  connection.onreconnecting(() => connection.events.push("reconnecting"));
  connection.onreconnected(() => connection.events.push("reconnected"));
  connection.onclose(() => connection.events.push("closed"));
  await connection.start();
  return connection;
}

for (const msgpack of [false, true]) {
  test(`a dropped connection resumes with its id and groups, and gets the 50 messages sent meanwhile once and in order (${msgpack ? "MessagePack" : "JSON"})`, { skip: ONCE, timeout: 60000 }, async () => {
    const server = await startServer(["--threads", "2"]);
    const cutter = await proxy(server.base);
    const clients = [];
    try {
      const a = await statefulClient(cutter.base, { msgpack });
      clients.push(a);
      await a.invoke("JoinGroup", "sr");
      const b = await connect(server.base);
      clients.push(b);
      await b.invoke("SendToGroup", "sr", "m", [-1]);
      await until(() => a.got.length === 1, 5000, "the first message");
      const id = a.connectionId;
      // Processed by the server just before the cut but not yet acknowledged (the
      // server acknowledges once a second), so the client's buffer sends them again on
      // the resumed connection: each must take effect once. Sent again in the rare case
      // an Ack came in between.
      await b.invoke("JoinGroup", "back");
      let sentBack = 0;
      for (let round = 0; round < 5; round++) {
        for (let i = 0; i < 10; i++) await a.send("SendToGroup", "back", "receive", [sentBack++]);
        await until(() => b.received.length === sentBack, 5000, "the client's sends");
        if (a._messageBuffer._messages.length >= 10) break;
      }
      ok(a._messageBuffer._messages.length >= 10, "unacknowledged sends at the cut");
      cutter.cut(800);
      for (let i = 0; i < 50; i++) await b.invoke("SendToGroup", "sr", "m", [i]);
      deepStrictEqual(await b.invoke("GroupCount", "sr"), { connections: 1, users: 0 }, "presence holds during the gap");
      await until(() => a.got.length >= 51, 15000, "the messages sent during the cut");
      await sleep(300);
      deepStrictEqual(a.got, [-1, ...Array.from({ length: 50 }, (_, i) => i)], "each once, in order");
      strictEqual(a.connectionId, id, "the same connection");
      strictEqual(a.state, HubConnectionState.Connected);
      deepStrictEqual(a.events, [], "no reconnect as a new connection");
      ok((await metric(server.base, "ringhub_resumes_total")) >= 1);
      ok((await metric(server.base, "ringhub_replayed_messages_total")) >= 50);

      // Still a member after the resume, and its own calls still work.
      await b.invoke("SendToGroup", "sr", "m", [50]);
      await until(() => a.got.length === 52, 5000, "a send after the resume");
      strictEqual(await a.invoke("Echo", 7), 7);
      deepStrictEqual(b.received, Array.from({ length: sentBack }, (_, i) => [i]), "the client's sends took effect once each");
    } finally {
      await Promise.all(clients.map((c) => c.stop().catch(() => {})));
      await cutter.close();
      await server.stop();
    }
  });
}

test("past --stateful-reconnect-buffer the resume is refused and the client comes back as a new connection", { skip: ONCE, timeout: 60000 }, async () => {
  const server = await startServer(["--threads", "1", "--stateful-reconnect-buffer", "2000"]);
  const cutter = await proxy(server.base);
  const clients = [];
  try {
    const a = await statefulClient(cutter.base, { automaticReconnect: true });
    clients.push(a);
    await a.invoke("JoinGroup", "big");
    const b = await connect(server.base);
    clients.push(b);
    const id = a.connectionId;
    cutter.cut(800);
    for (let i = 0; i < 50; i++) await b.invoke("SendToGroup", "big", "m", ["x".repeat(100)]);
    await until(() => a.events.includes("reconnected"), 15000, "a new connection");
    notStrictEqual(a.connectionId, id, "a new connection id");
    strictEqual(a.state, HubConnectionState.Connected);
    strictEqual(await metric(server.base, "ringhub_resumes_total"), 0);
    deepStrictEqual(await b.invoke("GroupCount", "big"), { connections: 0, users: 0 }, "the old connection left its groups");
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await cutter.close();
    await server.stop();
  }
});

test("a resume is authorized again: another user's token is refused, and groups the new token no longer allows are left", { skip: ONCE, timeout: 60000 }, async () => {
  const server = await startServer(["--threads", "2", "--jwt-secret", "test-secret"]);
  const cutter = await proxy(server.base);
  const clients = [];
  try {
    const admin = await connect(server.base, { accessToken: token({ sub: "desk", role: "admin" }) });
    clients.push(admin);

    // Same user, fewer rights: ward:2 is left on resume, ward:1 kept.
    let claims = { sub: "nurse", groups: ["ward:1", "ward:2"] };
    const nurse = await statefulClient(cutter.base, { accessToken: () => token(claims) });
    clients.push(nurse);
    await nurse.invoke("JoinGroup", "ward:1");
    await nurse.invoke("JoinGroup", "ward:2");
    const id = nurse.connectionId;
    claims = { sub: "nurse", groups: ["ward:1"] };
    cutter.cut(300);
    const resumed = await (async () => {
      for (let i = 0; i < 100; i++) {
        if ((await metric(server.base, "ringhub_resumes_total")) >= 1) return true;
        await sleep(100);
      }
      return false;
    })();
    ok(resumed, "the nurse resumed");
    strictEqual(nurse.connectionId, id);
    await admin.invoke("SendToGroup", "ward:2", "m", ["to ward 2"]);
    await admin.invoke("SendToGroup", "ward:1", "m", ["to ward 1"]);
    await until(() => nurse.got.includes("to ward 1"), 5000, "the ward 1 message");
    await sleep(300);
    deepStrictEqual(nurse.got, ["to ward 1"], "ward:2 was left on resume");
    deepStrictEqual(await admin.invoke("GroupCount", "ward:2"), { connections: 0, users: 0 });

    // Another user's token: refused, and the connection ends.
    let sub = "ann";
    const ann = await statefulClient(cutter.base, { accessToken: () => token({ sub, role: "admin" }) });
    clients.push(ann);
    const refusedBefore = await metric(server.base, "ringhub_resumes_refused_total");
    sub = "mallory";
    cutter.cut(300);
    await until(() => ann.state === HubConnectionState.Disconnected, 10000, "the refused resume to end the connection");
    ok((await metric(server.base, "ringhub_resumes_refused_total")) > refusedBefore, "counted as refused");
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await cutter.close();
    await server.stop();
  }
});

test("a connection that does not come back within the disconnect timeout leaves its groups then, and its resume is refused", { skip: ONCE, timeout: 60000 }, async () => {
  const server = await startServer(["--threads", "1", "--disconnect-timeout-secs", "2"]);
  const cutter = await proxy(server.base);
  const clients = [];
  try {
    const a = await statefulClient(cutter.base);
    clients.push(a);
    await a.invoke("JoinGroup", "gone");
    const b = await connect(server.base);
    clients.push(b);
    const cutAt = Date.now();
    cutter.cut(4000);
    await sleep(1000);
    deepStrictEqual(await b.invoke("GroupCount", "gone"), { connections: 1, users: 0 }, "kept during the gap");
    let left;
    while (Date.now() - cutAt < 3500) {
      const count = await b.invoke("GroupCount", "gone");
      if (count.connections === 0) {
        left = Date.now() - cutAt;
        break;
      }
      await sleep(50);
    }
    ok(left !== undefined && left >= 1900, `left the group ${left} ms after the cut (timeout 2 s)`);
    await until(() => a.state === HubConnectionState.Disconnected, 10000, "the late resume to be refused");
    strictEqual(await metric(server.base, "ringhub_resumes_total"), 0);
    strictEqual(await metric(server.base, "ringhub_resumes_refused_total"), 1, "the resume that came too late is counted as refused");
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await cutter.close();
    await server.stop();
  }
});

// End to end with the stock client, no authentication, two shards.
import { after, before, describe, test } from "node:test";
import { deepStrictEqual, ok, rejects, strictEqual } from "node:assert/strict";
import { connect, connectionsPerShard, raw, startServer, sleep, statusOf, until, upgradeRequest } from "./helpers.mjs";

let server;
const open = [];
async function client(options) {
  const c = await connect(server.base, options);
  open.push(c);
  return c;
}

before(async () => {
  server = await startServer(["--threads", "2"]);
});
after(async () => {
  await Promise.all(open.map((c) => c.stop().catch(() => {})));
  strictEqual(await server.stop(), 0, "server exits cleanly on SIGTERM");
});

describe("connecting", () => {
  test("negotiate gives a connection id; skipNegotiation works too", async () => {
    const negotiated = await client();
    strictEqual(typeof negotiated.connectionId, "string");
    strictEqual(negotiated.connectionId.length, 22);
    const direct = await client({ skipNegotiation: true });
    strictEqual(direct.connectionId, null);
    deepStrictEqual(await direct.invoke("Echo", "hi"), "hi");
  });

  test("negotiate offers the three transports; a token carries one connection, unknown tokens get 404", async () => {
    const res = await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST" });
    strictEqual(res.status, 200);
    const body = await res.json();
    strictEqual(body.negotiateVersion, 1);
    deepStrictEqual(body.availableTransports, [
      { transport: "WebSockets", transferFormats: ["Text", "Binary"] },
      { transport: "ServerSentEvents", transferFormats: ["Text"] },
      { transport: "LongPolling", transferFormats: ["Text", "Binary"] },
    ]);
    strictEqual(body.useStatefulReconnect, undefined);
    // The first upgrade holds its socket open (no handshake yet): the token is in use.
    const { createConnection } = await import("node:net");
    const { hostname, port } = new URL(server.base);
    const first = createConnection({ host: hostname, port: Number(port) });
    const firstAnswer = new Promise((resolve) => first.once("data", resolve));
    first.write(upgradeRequest(`/hubs/chat?id=${body.connectionToken}`));
    strictEqual(statusOf(await firstAnswer), 101);
    strictEqual(statusOf(await raw(server.base, upgradeRequest(`/hubs/chat?id=${body.connectionToken}`))), 409, "in use");
    first.destroy();
    // Once that connection is gone, so is its token.
    let after;
    for (let i = 0; i < 50 && after !== 404; i++) {
      await sleep(20);
      after = statusOf(await raw(server.base, upgradeRequest(`/hubs/chat?id=${body.connectionToken}`), 300));
    }
    strictEqual(after, 404, "tokens are single-use");
    strictEqual(statusOf(await raw(server.base, upgradeRequest("/hubs/chat?id=nonexistent"))), 404);
    const noVersion = upgradeRequest("/hubs/chat").replace("Sec-WebSocket-Version: 13\r\n", "");
    strictEqual(statusOf(await raw(server.base, noVersion)), 426);
  });

  test("health, metrics, unknown paths", async () => {
    strictEqual((await fetch(`${server.base}/healthz`)).status, 200);
    const metrics = await (await fetch(`${server.base}/metrics`)).text();
    for (const name of ["ringhub_connections", "ringhub_groups", "ringhub_messages_received_total", "ringhub_deliveries_total", "ringhub_bytes_sent_total", "ringhub_slow_consumer_closes_total", "ringhub_protocol_errors_total"]) {
      ok(metrics.includes(name), name);
    }
    strictEqual((await fetch(`${server.base}/nope`)).status, 404);
    strictEqual((await fetch(`${server.base}/hubs/bad name!/negotiate`, { method: "POST" })).status, 404);
    strictEqual((await fetch(`${server.base}/hubs/chat/negotiate`)).status, 405);
  });
});

describe("methods", () => {
  test("Echo returns every JSON kind unchanged, in both protocols", async () => {
    const values = ["text", 42, -7, 1.5, true, false, null, [1, "two", [3]], { nested: { deep: [null, { x: 1 }] } }, "héllo € 😀", 2 ** 40];
    for (const msgpack of [false, true]) {
      const c = await client({ msgpack });
      for (const value of values) {
        deepStrictEqual(await c.invoke("Echo", value), value);
      }
    }
  });

  test("errors complete the call and keep the connection open", async () => {
    const c = await client();
    await rejects(c.invoke("NoSuchMethod"), { message: "Unknown hub method 'NoSuchMethod'" });
    await rejects(c.invoke("JoinGroup", 5), /argument 1 must be a string, got a number/);
    await rejects(c.invoke("JoinGroup"), /expected 1 argument, got 0/);
    await rejects(c.invoke("SendToGroup", "g", "receive", "not an array"), /must be an array/);
    strictEqual(await c.invoke("Echo", "still here"), "still here");
    strictEqual(await c.invoke("joingroup", "case-insensitive"), null);
  });
});

describe("targeting", () => {
  test("every target reaches exactly its recipients, once each", async () => {
    const cs = [];
    for (let i = 0; i < 6; i++) cs.push(await client({ msgpack: i % 2 === 1 }));
    const [c0, c1, c2, c3, c4] = cs;
    const hub = "targeting";
    for (const c of cs) c.received.length = 0;
    await c1.invoke("JoinGroup", "g1");
    await c2.invoke("JoinGroup", "g1");
    await c2.invoke("JoinGroup", "g2");
    await c3.invoke("JoinGroup", "g2");
    const others = open.filter((c) => !cs.includes(c));
    const cases = [
      ["SendToGroup", ["g1"], [1, 2]],
      ["SendToGroupExcept", ["g1", [c1.connectionId]], [2]],
      ["SendToOthersInGroup", ["g1"], [2], c1],
      ["SendToGroups", [["g1", "g2"]], [1, 2, 3]],
      ["SendToConnection", [c4.connectionId], [4]],
      ["SendToGroup", ["empty-group"], []],
    ];
    for (const [index, [method, leading, expected, sender = c0]] of cases.entries()) {
      const tag = `${method}-${index}`;
      strictEqual(await sender.invoke(method, ...leading, "receive", [tag]), null, method);
      const got = () => cs.flatMap((c, i) => c.received.filter((args) => args[0] === tag).map(() => i));
      await until(() => got().length >= expected.length, 3000, `${tag} deliveries`);
      await sleep(100);
      deepStrictEqual(got().sort(), expected, `${method} recipients`);
    }
    // All and Others reach every connection of the hub (the other tests' clients too).
    await c0.invoke("SendToAll", "receive", ["all"]);
    await c0.invoke("SendToOthers", "receive", ["others"]);
    const everyone = [...cs, ...others];
    const count = (tag) => everyone.map((c) => c.received.filter((args) => args[0] === tag).length);
    await until(() => count("all").every((n) => n === 1) && count("others").slice(1).every((n) => n === 1), 3000, "broadcasts");
    await sleep(100);
    deepStrictEqual(count("all"), everyone.map(() => 1));
    deepStrictEqual(count("others"), everyone.map((_, i) => (i === 0 ? 0 : 1)));
    // Leaving stops delivery; leaving again is not an error.
    await c1.invoke("LeaveGroup", "g1");
    strictEqual(await c1.invoke("LeaveGroup", "g1"), null);
    await c0.invoke("SendToGroup", "g1", "receive", ["after-leave"]);
    await until(() => c2.received.some((a) => a[0] === "after-leave"));
    await sleep(100);
    strictEqual(c1.received.filter((a) => a[0] === "after-leave").length, 0);
    void hub;
  });

  test("a JSON and a MessagePack client in one group get the same arguments", async () => {
    const json = await client();
    const msgpack = await client({ msgpack: true });
    const sender = await client({ msgpack: true });
    await json.invoke("JoinGroup", "mixed");
    await msgpack.invoke("JoinGroup", "mixed");
    const payload = ["mixed", { n: 1, list: [1.5, "x", null], nested: { ok: true } }, 123456789];
    await sender.invoke("SendToGroup", "mixed", "receive", payload);
    await until(() => json.received.length > 0 && msgpack.received.length > 0);
    deepStrictEqual(json.received[0], payload);
    deepStrictEqual(msgpack.received[0], payload);
  });

  test("1,000 messages arrive in order, none lost or duplicated, on both shards", async () => {
    // Connect until both shards hold members.
    const members = [];
    for (let i = 0; i < 40; i++) {
      const c = await client({ msgpack: i % 2 === 0 });
      await c.invoke("JoinGroup", "ordered");
      members.push(c);
      const perShard = await connectionsPerShard(server.base);
      if (members.length >= 4 && perShard.length === 2 && perShard.every((n) => n >= 2)) break;
    }
    const perShard = await connectionsPerShard(server.base);
    ok(perShard.every((n) => n >= 2), `members on both shards: ${perShard}`);
    const sender = await client();
    const total = 1000;
    const sends = [];
    for (let i = 0; i < total; i++) sends.push(sender.send("SendToGroup", "ordered", "receive", ["seq", i]));
    await Promise.all(sends);
    await until(() => members.every((m) => m.received.length >= total), 20000, "1,000 deliveries");
    await sleep(100);
    for (const m of members) {
      deepStrictEqual(m.received.map((args) => args[1]), [...Array(total).keys()]);
    }
  });

  test("disconnect removes a connection from its groups", async () => {
    const stays = await client();
    const leaves = await client();
    await stays.invoke("JoinGroup", "churn");
    await leaves.invoke("JoinGroup", "churn");
    await leaves.stop();
    const sender = await client();
    await sender.invoke("SendToGroup", "churn", "receive", ["x"]);
    await until(() => stays.received.length === 1);
    strictEqual(leaves.received.length, 0);
  });
});

describe("browsers on another origin", () => {
  test("CORS: preflight and negotiate allow the page's origin with credentials", async () => {
    const origin = "http://app.example:8080";
    const preflight = await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, {
      method: "OPTIONS",
      headers: { Origin: origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-requested-with,x-signalr-user-agent,authorization" },
    });
    strictEqual(preflight.status, 204);
    strictEqual(preflight.headers.get("access-control-allow-origin"), origin);
    strictEqual(preflight.headers.get("access-control-allow-credentials"), "true");
    strictEqual(preflight.headers.get("access-control-allow-headers"), "x-requested-with,x-signalr-user-agent,authorization");
    const negotiate = await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST", headers: { Origin: origin } });
    strictEqual(negotiate.status, 200);
    strictEqual(negotiate.headers.get("access-control-allow-origin"), origin);
    const sameOrigin = await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST" });
    strictEqual(sameOrigin.headers.get("access-control-allow-origin"), null);
  });
});

// Upstream webhooks (contract section 11), as an app written for Azure SignalR
// Service's serverless mode hears its clients: a real upstream HTTP server here checks
// every request's X-ASRS-* headers and its signature (HMAC-SHA256 of the connection id
// under each access key, node's crypto) and answers invocations with Completion
// messages; stock @microsoft/signalr clients connect through an app's negotiate
// redirect (Azure's client endpoint) or plainly, over JSON and MessagePack.
import { after, before, describe, test } from "node:test";
import { deepStrictEqual, match, ok, strictEqual } from "node:assert/strict";
import { createHmac } from "node:crypto";
import { writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { join } from "node:path";
import { HubConnectionBuilder, HttpTransportType, LogLevel } from "@microsoft/signalr";
// The MessagePack codec the stock MessagePack protocol is built on.
import { decode, encode } from "@msgpack/msgpack";
import { ONCE, TRANSPORT, connect, freePort, metric, sleep, startRedis, startServer, tempDataDir, until } from "./helpers.mjs";

const KEY = "azure-access-key-0123456789";
const OLD_KEY = "the-key-being-rotated-out";

let server;
let upstream;
let app;
const open = [];

const b64url = (data) => Buffer.from(data).toString("base64url");
function sign(claims, key = KEY) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ iat: now, nbf: now, exp: now + 3600, ...claims }));
  return `${header}.${body}.${createHmac("sha256", key).update(`${header}.${body}`).digest("base64url")}`;
}

/** What Azure puts in X-ASRS-Signature for a connection: one `sha256=HEX` per key. */
const signatureOf = (id) => [KEY, OLD_KEY].map((key) => `sha256=${createHmac("sha256", key).update(id).digest("hex")}`);

/** The upstream: records every request (after checking its signature) and answers
 *  `messages` events by their name. */
async function startUpstream() {
  const requests = [];
  const http = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const id = req.headers["x-asrs-connection-id"];
      // Azure's readers compare case-insensitively; both keys of a rotation sign.
      const signed = (req.headers["x-asrs-signature"] ?? "").toLowerCase().split(",");
      const request = { url: req.url, headers: req.headers, body, signed: id !== undefined && deepEqual(signed, signatureOf(id)) };
      requests.push(request);
      if (!request.signed) return res.writeHead(401).end();
      const [, , category, event] = req.url.split("/");
      if (category === "connections") return res.writeHead(200).end();
      answer(req.headers["content-type"], event, body, res);
    });
  });
  await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
  return { port: http.address().port, requests, close: () => new Promise((r) => http.close(r)) };
}

const deepEqual = (a, b) => JSON.stringify(a) === JSON.stringify(b);

/** Answers an invocation as Azure's Functions extension does: a Completion message in
 *  the client's protocol (JSON framed with 0x1E here, MessagePack without its length
 *  prefix, both accepted), `204` for nothing, an error status for a failure. */
function answer(contentType, event, body, res) {
  const msgpack = contentType === "application/x-msgpack";
  // JSON: the Invocation message without its 0x1E; MessagePack: without length prefix.
  const invocation = msgpack ? decode(body) : JSON.parse(body.toString("utf8"));
  const [id, target, args] = msgpack ? [invocation[2], invocation[3], invocation[4]] : [invocation.invocationId, invocation.target, invocation.arguments];
  strictEqual(target, event, "the event is the invocation's target");
  const complete = (result, error) => {
    if (msgpack) {
      const message = error === undefined ? [3, {}, id, 3, result] : [3, {}, id, 1, error];
      return res.writeHead(200, { "content-type": contentType }).end(Buffer.from(encode(message)));
    }
    const message = error === undefined ? { type: 3, invocationId: id, result } : { type: 3, invocationId: id, error };
    res.writeHead(200, { "content-type": contentType }).end(JSON.stringify(message) + "\x1e");
  };
  switch (event) {
    case "add":
      return complete(args[0] + args[1]);
    case "refuse":
      return complete(undefined, "not today");
    case "broken":
      return res.writeHead(503).end("down for maintenance");
    case "garbage":
      return res.writeHead(200).end("this is not a Completion message");
    default:
      return res.writeHead(204).end();
  }
}

/** The app's negotiate endpoint (as in azure.test.mjs): it sends clients to the
 *  service's client endpoint with a token signed with the access key. */
async function startApp() {
  const http = createServer((req, res) => {
    const url = new URL(req.url, "http://app");
    const hub = url.pathname.split("/")[1];
    const clientUrl = `${server.base}/client/?hub=${hub}`;
    const user = url.searchParams.get("user");
    const accessToken = sign({ aud: clientUrl, nameid: user, role: "reader" });
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ url: clientUrl, accessToken }));
  });
  await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
  return { base: `http://127.0.0.1:${http.address().port}`, close: () => new Promise((r) => http.close(r)) };
}

const transport = HttpTransportType[TRANSPORT ?? "WebSockets"];

/** A stock client redirected by the app's negotiate to the client endpoint. */
async function azureClient(user, hub = "chat") {
  const connection = new HubConnectionBuilder()
    .withUrl(`${app.base}/${hub}?user=${user}`, { transport })
    .configureLogging(LogLevel.None)
    .build();
  await connection.start();
  open.push(connection);
  return connection;
}

const eventsOf = (id, event) => upstream.requests.filter((r) => r.headers["x-asrs-connection-id"] === id && r.headers["x-asrs-event"] === event);

before(async () => {
  upstream = await startUpstream();
  const dead = await freePort();
  // Hub "down" goes to a port nobody listens on (its events are retried, then
  // dropped and counted); every other hub to the upstream above.
  const config = join(tempDataDir(), "ringhub.toml");
  writeFileSync(
    config,
    `upstream-retry-secs = 1

[[upstream]]
url_template = "http://127.0.0.1:${dead}/{hub}/{category}/{event}"
hub_pattern = "down"

[[upstream]]
url_template = "http://127.0.0.1:${upstream.port}/{hub}/{category}/{event}"
category_pattern = "connections, messages"
`,
  );
  server = await startServer(["--threads", "2", "--config", config, "--access-key", KEY, "--access-key", OLD_KEY]);
  app = await startApp();
});
after(async () => {
  await Promise.all(open.map((c) => c.stop().catch(() => {})));
  await app.close();
  await upstream.close();
  strictEqual(await server.stop(), 0);
});

describe("upstream", () => {
  test("connected and disconnected reach the upstream once each, signed, with the connection's headers", async () => {
    const ann = await azureClient("ann");
    const id = ann.connectionId;
    await until(() => eventsOf(id, "connected").length === 1, 5000, "connected");
    const [connected] = eventsOf(id, "connected");
    strictEqual(connected.url, "/chat/connections/connected");
    ok(connected.signed, "signed with both keys");
    strictEqual(connected.headers["x-asrs-hub"], "chat");
    strictEqual(connected.headers["x-asrs-category"], "connections");
    strictEqual(connected.headers["x-asrs-user-id"], "ann");
    match(connected.headers["x-asrs-user-claims"], /(^|, )nameid: ann(, |$)/);
    match(connected.headers["x-asrs-user-claims"], /(^|, )role: reader(, |$)/);
    // The client's query (the hub and its negotiate id), without its access token.
    match(connected.headers["x-asrs-client-query"], /^\?hub=chat&id=/);
    ok(!connected.headers["x-asrs-client-query"].includes("access_token"));
    strictEqual(connected.headers["content-type"], "application/json");
    deepStrictEqual(JSON.parse(connected.body), { type: 10 });
    await ann.stop();
    await until(() => eventsOf(id, "disconnected").length === 1, 5000, "disconnected");
    deepStrictEqual(JSON.parse(eventsOf(id, "disconnected")[0].body), { type: 11 });
    await sleep(300);
    strictEqual(eventsOf(id, "connected").length, 1, "connected once");
    strictEqual(eventsOf(id, "disconnected").length, 1, "disconnected once");
  });

  test("an invocation that is not a built-in method is answered by the upstream (JSON, through the client endpoint)", async () => {
    const bob = await azureClient("bob");
    strictEqual(await bob.invoke("add", 2, 3), 5);
    const [call] = upstream.requests.filter((r) => r.url === "/chat/messages/add" && r.headers["x-asrs-connection-id"] === bob.connectionId);
    ok(call.signed);
    strictEqual(call.headers["x-asrs-category"], "messages");
    strictEqual(call.headers["x-asrs-event"], "add");
    strictEqual(call.headers["x-asrs-user-id"], "bob");
    strictEqual(call.headers["content-type"], "application/json");
    const invocation = JSON.parse(call.body.toString("utf8"));
    deepStrictEqual(invocation, { type: 1, invocationId: invocation.invocationId, target: "add", arguments: [2, 3] });
    strictEqual(call.headers["x-asrs-invocation-id"], invocation.invocationId);
    // A built-in method stays here.
    strictEqual(await bob.invoke("Echo", "here"), "here");
    ok(!upstream.requests.some((r) => r.url.endsWith("/Echo")), "Echo is built in");
    // A 204 is a null result; a Completion error, an error status and an answer that
    // is not a Completion are the invocation's error.
    strictEqual(await bob.invoke("nothing"), null);
    await bob.invoke("refuse").then(() => ok(false, "refused"), (e) => match(e.message, /not today/));
    await bob.invoke("broken").then(() => ok(false, "failed"), (e) => match(e.message, /Invocation failed, status code 503/));
    await bob.invoke("garbage").then(() => ok(false, "failed"), (e) => match(e.message, /Invocation failed, the upstream's answer/));
    // The connection is fine after all that.
    strictEqual(await bob.invoke("add", 40, 2), 42);
  });

  test("a send reaches the upstream, and nothing comes back", async () => {
    const cat = await azureClient("cat");
    await cat.send("notify", "hello");
    await until(() => upstream.requests.some((r) => r.url === "/chat/messages/notify"), 5000, "the send");
    const sent = upstream.requests.find((r) => r.url === "/chat/messages/notify");
    const invocation = JSON.parse(sent.body.toString("utf8"));
    deepStrictEqual(invocation, { type: 1, target: "notify", arguments: ["hello"] });
    strictEqual(sent.headers["x-asrs-invocation-id"], undefined);
    strictEqual(await cat.invoke("add", 1, 1), 2, "the connection goes on");
  });

  test("MessagePack clients connected plainly go up in MessagePack", { skip: TRANSPORT === "ServerSentEvents" && "MessagePack needs a binary transport" }, async () => {
    const dan = await connect(server.base, { hub: "chat", msgpack: true });
    open.push(dan);
    strictEqual(await dan.invoke("add", 20, 22), 42);
    const call = upstream.requests.find((r) => r.url === "/chat/messages/add" && r.headers["x-asrs-connection-id"] === dan.connectionId);
    strictEqual(call.headers["content-type"], "application/x-msgpack");
    const [type, headers, id, target, args] = decode(call.body);
    deepStrictEqual([type, headers, target, args], [1, {}, "add", [20, 22]]);
    strictEqual(call.headers["x-asrs-invocation-id"], id);
    strictEqual(call.headers["x-asrs-user-id"], undefined, "anonymous");
    await dan.invoke("refuse").then(() => ok(false, "refused"), (e) => match(e.message, /not today/));
  });

  test("an upstream that is down: its events are retried, then dropped and counted; its invocations fail", { skip: ONCE }, async () => {
    const failures = (category) =>
      fetch(`${server.base}/metrics`)
        .then((r) => r.text())
        .then((text) => Number(new RegExp(`^ringhub_upstream_failures_total\\{category="${category}"\\} (\\d+)$`, "m").exec(text)?.[1]));
    const before = { connections: await failures("connections"), messages: await failures("messages") };
    const started = Date.now();
    const eve = await azureClient("eve", "down");
    // Its first attempt failed at once: the connection was not held for the retries.
    ok(Date.now() - started < 3000);
    await eve.invoke("add", 1, 2).then(() => ok(false, "failed"), (e) => match(e.message, /Invocation failed, the upstream cannot be reached/));
    strictEqual(await failures("messages"), before.messages + 1);
    // Retried for --upstream-retry-secs (1 s here), then counted.
    await sleep(300);
    strictEqual(await failures("connections"), before.connections, "still retrying");
    const deadline = Date.now() + 5000;
    while ((await failures("connections")) !== before.connections + 1 && Date.now() < deadline) await sleep(100);
    strictEqual(await failures("connections"), before.connections + 1, "connected dropped after its retries");
    strictEqual(await metric(server.base, "ringhub_upstream_failures_total"), before.connections + before.messages + 2);
    ok(!upstream.requests.some((r) => r.headers["x-asrs-hub"] === "down"), "nothing of hub down reached the other upstream");
  });
});

describe("upstream in a cluster", () => {
  test("two nodes on one Redis: each connection's events are sent once, by its node, and an invocation is answered once", { skip: ONCE }, async () => {
    // An upstream of its own (the counts are this test's), both nodes sending to it with
    // the same keys, as the nodes of one Azure-style deployment would.
    const up = await startUpstream();
    const redis = await startRedis();
    const nodes = [];
    const clients = [];
    try {
      for (const name of ["a", "b"]) {
        const node = await startServer([
          "--threads", "2", "--redis", redis.url, "--node-name", name,
          "--upstream", `http://127.0.0.1:${up.port}/{hub}/{category}/{event}`,
          "--access-key", KEY, "--access-key", OLD_KEY,
        ]);
        nodes.push(node);
        const deadline = Date.now() + 5000;
        while ((await metric(node.base, "ringhub_backplane_connected")) !== 1) {
          ok(Date.now() < deadline, `node ${name} connected to Redis`);
          await sleep(20);
        }
      }
      const [a, b] = nodes;
      // Each node has heard the other (a heartbeat a second).
      await sleep(1200);
      // Two clients on each node, through each node's client endpoint.
      const join = async (node, user) => {
        const url = `${node.base}/client/?hub=chat`;
        const c = new HubConnectionBuilder()
          .withUrl(url, { accessTokenFactory: () => sign({ aud: url, nameid: user }), transport: HttpTransportType.WebSockets })
          .configureLogging(LogLevel.None)
          .build();
        await c.start();
        clients.push(c);
        return c;
      };
      const [a1, a2, b1, b2] = [await join(a, "a1"), await join(a, "a2"), await join(b, "b1"), await join(b, "b2")];
      const ids = clients.map((c) => c.connectionId);
      // The cluster is one: node a knows the connections that node b holds (so both nodes
      // hear of every connection, and only one may send its events).
      const exists = (node, id) =>
        fetch(`${node.base}/api/hubs/chat/connections/${id}?api-version=2024-12-01`, {
          method: "HEAD",
          headers: { authorization: `Bearer ${sign({ aud: `${node.base}/api/hubs/chat/connections/${id}` })}` },
        }).then((r) => r.status);
      strictEqual(await exists(a, b1.connectionId), 200, "node a sees b1, held by node b");
      strictEqual(await exists(b, a1.connectionId), 200, "node b sees a1, held by node a");

      const events = (id, event) => up.requests.filter((r) => r.headers["x-asrs-connection-id"] === id && r.headers["x-asrs-event"] === event);
      await until(() => ids.every((id) => events(id, "connected").length > 0), 5000, "connected of every connection");
      // Time for a second copy (another node's) to arrive, if one were sent.
      await sleep(500);
      for (const [i, id] of ids.entries()) {
        strictEqual(events(id, "connected").length, 1, `connected of client ${i} once`);
        ok(events(id, "connected")[0].signed);
      }
      // Each with what only the node that holds the connection has: its user's claims and
      // the client's query.
      deepStrictEqual(ids.map((id) => events(id, "connected")[0].headers["x-asrs-user-id"]), ["a1", "a2", "b1", "b2"]);
      for (const [i, id] of ids.entries()) {
        const { headers } = events(id, "connected")[0];
        match(headers["x-asrs-user-claims"], new RegExp(`(^|, )nameid: ${["a1", "a2", "b1", "b2"][i]}(, |$)`));
        match(headers["x-asrs-client-query"], /^\?hub=chat&id=/);
      }

      // An invocation on node b goes up once and is answered once.
      strictEqual(await b1.invoke("add", 20, 22), 42);
      const adds = () => up.requests.filter((r) => r.url === "/chat/messages/add");
      strictEqual(adds().length, 1, "one upstream call for the invocation");
      strictEqual(adds()[0].headers["x-asrs-connection-id"], b1.connectionId);
      strictEqual(await b1.invoke("Echo", "still here"), "still here");
      strictEqual(await a2.invoke("add", 1, 2), 3);
      await sleep(300);
      strictEqual(adds().length, 2, "one upstream call per invocation, on either node");
      deepStrictEqual(adds().map((r) => r.headers["x-asrs-connection-id"]), [b1.connectionId, a2.connectionId]);

      // A group with members on both nodes is listed, and closed, whole from either node.
      const rest = (node, method, path) =>
        fetch(`${node.base}${path}?api-version=2024-12-01`, { method, headers: { authorization: `Bearer ${sign({ aud: `${node.base}${path}` })}` } });
      for (const member of [a1, b1]) {
        strictEqual((await rest(a, "PUT", `/api/hubs/chat/groups/ward/connections/${member.connectionId}`)).status, 200);
      }
      for (const node of [a, b]) {
        const listed = await (await rest(node, "GET", "/api/hubs/chat/groups/ward/connections")).json();
        deepStrictEqual(listed.value.map((m) => m.connectionId).sort(), [a1.connectionId, b1.connectionId].sort(), "every node's members");
      }
      let b1Closed = false;
      b1.onclose(() => (b1Closed = true));
      strictEqual((await rest(a, "POST", "/api/hubs/chat/groups/ward/:closeConnections")).status, 204);
      await until(() => b1Closed, 5000, "node b's member of the group closed through node a");

      for (const c of [a1, a2, b1, b2]) await c.stop();
      await until(() => ids.every((id) => events(id, "disconnected").length > 0), 5000, "disconnected of every connection");
      await sleep(500);
      for (const [i, id] of ids.entries()) {
        strictEqual(events(id, "disconnected").length, 1, `disconnected of client ${i} once`);
        strictEqual(events(id, "connected").length, 1, `still one connected of client ${i}`);
      }
    } finally {
      await Promise.all(clients.map((c) => c.stop().catch(() => {})));
      for (const node of nodes) strictEqual(await node.stop(), 0);
      await redis.stop();
      await up.close();
    }
  });
});

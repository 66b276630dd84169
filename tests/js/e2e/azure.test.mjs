// Azure SignalR Service compatibility (contract section 11), as an app written for
// Azure's serverless mode uses it: stock @microsoft/signalr clients follow an app's
// negotiate redirect ({url, accessToken}, a small HTTP server here) to ringhub's client
// endpoint, and the app pushes through Azure's REST API with access-key JWTs signed
// here with node's crypto. The REST shapes are checked against the parts of Azure's
// swagger kept in tests/azure/ (status codes, ErrorDetail, GroupMemberPagedValues).
import { after, before, describe, test } from "node:test";
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { createConnection, createServer as createTcpServer } from "node:net";
import { HubConnectionBuilder, HttpTransportType, LogLevel } from "@microsoft/signalr";
import { ONCE, TRANSPORT, sleep, startServer, until } from "./helpers.mjs";

const KEY = "azure-access-key-0123456789";
const OLD_KEY = "the-key-being-rotated-out";
const API_KEY = "ringhub-rest-key";
const SWAGGER = JSON.parse(readFileSync(new URL("../../azure/swagger-2024-12-01.json", import.meta.url), "utf8"));

let server;
let app;
const open = [];

const b64url = (data) => Buffer.from(data).toString("base64url");
/** An HS256 JWT signed with an access key, as Azure's SDKs make them. */
function sign(claims, { key = KEY, expiresIn = 3600 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ iat: now, nbf: now, exp: now + expiresIn, ...claims }));
  const signature = createHmac("sha256", key).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

/** A call to Azure's REST API with a token for its URL (the audience: the URL without
 *  its query), unless `token` says otherwise (`null`: none). */
async function azure(method, pathAndQuery, { body, token, key, contentType = "application/json" } = {}) {
  const url = `${server.base}${pathAndQuery}`;
  const audience = url.split("?")[0];
  const bearer = token === undefined ? sign({ aud: audience }, { key }) : token;
  const res = await fetch(url, {
    method,
    headers: {
      ...(bearer === null ? {} : { authorization: `Bearer ${bearer}` }),
      "content-type": contentType,
    },
    body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, body: text ? JSON.parse(text) : null };
}

/** The swagger's answer codes for an operation (the success codes it names, and
 *  whether it lets errors carry ErrorDetail). */
function swaggerCodes(path, method) {
  const operation = SWAGGER.paths[path]?.[method];
  ok(operation, `${method.toUpperCase()} ${path} is in Azure's swagger`);
  return Object.keys(operation.responses).filter((c) => c !== "default").map(Number);
}

/** Checks a reply against the swagger's operation: a success code it names, or an
 *  ErrorDetail body with the x-ms-error-code header. */
function matchesSwagger(reply, path, method) {
  const codes = swaggerCodes(path, method);
  if (codes.includes(reply.status)) return;
  ok(reply.status >= 400, `${method} ${path}: ${reply.status} is neither one of ${codes} nor an error`);
  checkErrorDetail(reply);
}

function checkErrorDetail(reply) {
  const properties = Object.keys(SWAGGER.definitions.ErrorDetail.properties);
  ok(reply.body && typeof reply.body.code === "string" && typeof reply.body.message === "string", `ErrorDetail body: ${JSON.stringify(reply.body)}`);
  for (const name of Object.keys(reply.body)) ok(properties.includes(name), `ErrorDetail has no '${name}'`);
  strictEqual(reply.headers.get("x-ms-error-code"), reply.body.code);
}

/** The app's negotiate endpoint, as an Azure Functions app writes it: it redirects the
 *  client to the service's client endpoint with a token signed with the access key
 *  (user id in `nameid`). `service` is where clients are sent (ringhub, or a proxy). */
async function startApp(service) {
  const http = createServer((req, res) => {
    const url = new URL(req.url, "http://app");
    const hub = url.pathname.split("/")[1];
    if (req.method !== "POST" || !url.pathname.endsWith("/negotiate")) {
      res.writeHead(404).end();
      return;
    }
    const clientUrl = `${app.service}/client/?hub=${hub}`;
    const user = url.searchParams.get("user");
    const accessToken = sign({ aud: clientUrl, ...(user ? { nameid: user, role: "reader" } : {}) });
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ url: clientUrl, accessToken }));
  });
  await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
  return { base: `http://127.0.0.1:${http.address().port}`, service, close: () => new Promise((r) => http.close(r)) };
}

/** The transports of this run: the suite's (scripts/test.sh runs it once per transport),
 *  or all three. */
const TRANSPORTS = TRANSPORT ? [TRANSPORT] : ["WebSockets", "ServerSentEvents", "LongPolling"];

/** A stock client that connects through the app's negotiate and records `news(...)`. */
async function client({ user, transport = TRANSPORTS[0], hub = "Chat", stateful = false } = {}) {
  const query = user ? `?user=${encodeURIComponent(user)}` : "";
  let builder = new HubConnectionBuilder()
    .withUrl(`${app.base}/${hub}${query}`, { transport: HttpTransportType[transport] })
    .configureLogging(LogLevel.None);
  if (stateful) builder = builder.withStatefulReconnect();
  const connection = builder.build();
  connection.received = [];
  connection.on("news", (...args) => connection.received.push(args));
  await connection.start();
  open.push(connection);
  return connection;
}

before(async () => {
  server = await startServer(["--threads", "2", "--access-key", KEY, "--access-key", OLD_KEY, "--api-key", API_KEY]);
  app = await startApp(server.base);
});
after(async () => {
  await Promise.all(open.map((c) => c.stop().catch(() => {})));
  await app.close();
  strictEqual(await server.stop(), 0);
});

describe("clients redirected by an app's negotiate", () => {
  for (const transport of TRANSPORTS) {
    test(`reach ringhub's client endpoint over ${transport}, and REST sends of both families reach them`, async () => {
      const [ann, bob] = [await client({ user: "ann", transport }), await client({ user: "bob", transport })];
      ok(ann.connectionId && bob.connectionId);
      // The hub of /client/?hub=Chat is "chat": Azure's names are case-insensitive.
      strictEqual((await azure("POST", "/api/hubs/chat/:send?api-version=2024-12-01", { body: { target: "news", arguments: ["all"] } })).status, 202);
      strictEqual((await azure("POST", "/api/v1/hubs/CHAT/users/ann", { body: { Target: "news", Arguments: ["to ann (v1)"] } })).status, 202);
      const toBob = await azure("POST", `/api/hubs/Chat/connections/${bob.connectionId}/:send?api-version=2024-12-01`, { body: { target: "news", arguments: ["to bob"] } });
      matchesSwagger(toBob, "/api/hubs/{hub}/connections/{connectionId}/:send", "post");
      strictEqual(toBob.status, 202);
      await until(() => ann.received.length === 2 && bob.received.length === 2, 5000, "the sends");
      deepStrictEqual(ann.received, [["all"], ["to ann (v1)"]]);
      deepStrictEqual(bob.received, [["all"], ["to bob"]]);
      // ringhub's own REST API and /hubs/ keep working beside it.
      const own = await fetch(`${server.base}/api/hubs/chat/users/ann`, { headers: { authorization: `Bearer ${API_KEY}` } });
      strictEqual(own.status, 200);
      deepStrictEqual((await own.json()).connectionIds, [ann.connectionId]);
      await ann.stop();
      await bob.stop();
    });
  }

  test("a stateful-reconnect client resumes its session through the client endpoint after its connection drops", { skip: ONCE }, async () => {
    const proxy = await tcpProxy(server.base);
    const redirected = await startApp(proxy.base);
    const saved = app;
    app = redirected;
    try {
      const carol = await client({ user: "carol", transport: "WebSockets", stateful: true });
      const id = carol.connectionId;
      ok(proxy.cut(500) > 0, "the client's connection went through the proxy and was cut");
      // Sent while carol is away: replayed when she resumes.
      strictEqual((await azure("POST", "/api/v1/hubs/chat/users/carol", { body: { target: "news", arguments: ["while away"] } })).status, 202);
      await until(() => carol.received.length === 1, 8000, "the replay");
      strictEqual(carol.connectionId, id, "the same session");
      deepStrictEqual(carol.received, [["while away"]]);
      await carol.stop();
    } finally {
      app = saved;
      await redirected.close();
      await proxy.close();
    }
  });

  test("a client without a valid access-key token is refused at the client endpoint", { skip: ONCE }, async () => {
    const url = `${server.base}/client/negotiate?hub=chat&negotiateVersion=1`;
    strictEqual((await fetch(url, { method: "POST" })).status, 401);
    const aud = `${server.base}/client/?hub=chat`;
    const wrongKey = sign({ aud }, { key: "not-the-key" });
    strictEqual((await fetch(url, { method: "POST", headers: { authorization: `Bearer ${wrongKey}` } })).status, 401);
    const otherHub = sign({ aud: `${server.base}/client/?hub=other` });
    strictEqual((await fetch(url, { method: "POST", headers: { authorization: `Bearer ${otherHub}` } })).status, 401);
    const expired = sign({ aud }, { expiresIn: -600 });
    strictEqual((await fetch(url, { method: "POST", headers: { authorization: `Bearer ${expired}` } })).status, 401);
    const good = await fetch(url, { method: "POST", headers: { authorization: `Bearer ${sign({ aud })}` } });
    strictEqual(good.status, 200);
    ok((await good.json()).connectionToken);
  });
});

describe("Azure's REST API", { skip: ONCE }, () => {
  test("groups: connections and users (ttl), existence checks, paging, removal from all groups", async () => {
    const [ann, bob, cy] = [await client({ user: "ann" }), await client({ user: "bob" }), await client({ user: "cy" })];
    const v = "api-version=2024-12-01";
    const add = await azure("PUT", `/api/hubs/chat/groups/ward/connections/${ann.connectionId}?${v}`);
    matchesSwagger(add, "/api/hubs/{hub}/groups/{group}/connections/{connectionId}", "put");
    strictEqual(add.status, 200);
    strictEqual((await azure("PUT", `/api/v1/hubs/chat/groups/ward/connections/${bob.connectionId}`)).status, 202);
    const addUser = await azure("PUT", `/api/hubs/chat/users/cy/groups/ward?${v}&ttl=2`);
    matchesSwagger(addUser, "/api/hubs/{hub}/users/{user}/groups/{group}", "put");
    strictEqual(addUser.status, 200);

    strictEqual((await azure("HEAD", `/api/hubs/chat/groups/ward?${v}`)).status, 200);
    strictEqual((await azure("HEAD", `/api/hubs/chat/groups/empty?${v}`)).status, 404);
    strictEqual((await azure("HEAD", `/api/hubs/chat/users/ann?${v}`)).status, 200);
    strictEqual((await azure("HEAD", `/api/hubs/chat/users/nobody?${v}`)).status, 404);
    strictEqual((await azure("HEAD", `/api/hubs/chat/connections/${cy.connectionId}?${v}`)).status, 200);
    strictEqual((await azure("HEAD", `/api/hubs/chat/connections/gone?${v}`)).status, 404);
    strictEqual((await azure("HEAD", `/api/hubs/chat/users/cy/groups/ward?${v}`)).status, 200);
    strictEqual((await azure("GET", `/api/v1/hubs/chat/groups/ward/users/ann`)).status, 200);
    strictEqual((await azure("GET", `/api/v1/hubs/chat/groups/ward/users/nobody`)).status, 404);

    // Paged: two per page, following nextLink (an absolute URL) until there is none.
    const members = [];
    let next = `/api/hubs/chat/groups/ward/connections?${v}&maxpagesize=2`;
    let pages = 0;
    while (next) {
      const page = await azure("GET", next);
      matchesSwagger(page, "/api/hubs/{hub}/groups/{group}/connections", "get");
      strictEqual(page.status, 200);
      for (const name of Object.keys(page.body)) ok(name in SWAGGER.definitions.GroupMemberPagedValues.properties, name);
      ok(page.body.value.length <= 2);
      members.push(...page.body.value);
      pages += 1;
      next = page.body.nextLink ? page.body.nextLink.slice(server.base.length) : null;
      if (next) ok(page.body.nextLink.startsWith(server.base), page.body.nextLink);
    }
    strictEqual(pages, 2);
    deepStrictEqual(
      members.map((m) => [m.connectionId, m.userId]).sort(),
      [[ann.connectionId, "ann"], [bob.connectionId, "bob"], [cy.connectionId, "cy"]].sort(),
    );
    const top = await azure("GET", `/api/hubs/chat/groups/ward/connections?${v}&top=1`);
    strictEqual(top.body.value.length, 1);
    strictEqual(top.body.nextLink, undefined, "top=1: one connection in all");

    strictEqual((await azure("POST", `/api/hubs/chat/groups/ward/:send?${v}&excluded=${bob.connectionId}`, { body: { target: "news", arguments: ["ward"] } })).status, 202);
    await until(() => ann.received.length === 1 && cy.received.length === 1, 5000, "the group send");

    // Removal: a connection from all its groups, a user from a group.
    const removeAll = await azure("DELETE", `/api/hubs/chat/connections/${ann.connectionId}/groups?${v}`);
    matchesSwagger(removeAll, "/api/hubs/{hub}/connections/{connectionId}/groups", "delete");
    strictEqual(removeAll.status, 200);
    strictEqual((await azure("DELETE", `/api/hubs/chat/groups/ward/connections/${bob.connectionId}?${v}`)).status, 200);
    strictEqual((await azure("POST", `/api/v1/hubs/chat/groups/ward`, { body: { target: "news", arguments: ["ward again"] } })).status, 202);
    await until(() => cy.received.length === 2, 5000, "the second group send");
    await sleep(100);
    strictEqual(ann.received.length, 1, "ann left every group");
    strictEqual(bob.received.length, 0, "bob was excluded, then removed");

    // cy's membership had a ttl of 2 s: it expires.
    const deadline = Date.now() + 6000;
    while ((await azure("HEAD", `/api/hubs/chat/groups/ward?${v}`)).status !== 404) {
      ok(Date.now() < deadline, "cy's membership (ttl 2 s) expired within 6 s");
      await sleep(100);
    }
    strictEqual((await azure("HEAD", `/api/hubs/chat/users/cy/groups/ward?${v}`)).status, 404);

    // Without ttl the membership is durable; removing the user from all groups ends it.
    strictEqual((await azure("PUT", `/api/v1/hubs/chat/groups/desk/users/ann`)).status, 202);
    strictEqual((await azure("HEAD", `/api/hubs/chat/groups/desk?${v}`)).status, 200);
    const userOut = await azure("DELETE", `/api/hubs/chat/users/ann/groups?${v}`);
    matchesSwagger(userOut, "/api/hubs/{hub}/users/{user}/groups", "delete");
    strictEqual(userOut.status, 204);
    strictEqual((await azure("HEAD", `/api/hubs/chat/groups/desk?${v}`)).status, 404);
    for (const c of [ann, bob, cy]) await c.stop();
  });

  test("closing one connection (reason) and :closeConnections of a user, a group and the hub (excluded)", async () => {
    const v = "api-version=2024-12-01";
    const closed = new Map();
    const watch = async (user) => {
      const c = await client({ user });
      c.onclose((error) => closed.set(user, error?.message ?? ""));
      return c;
    };
    const [ann, bob, cy, dee] = [await watch("ann"), await watch("bob"), await watch("cy"), await watch("dee")];
    const one = await azure("DELETE", `/api/hubs/chat/connections/${ann.connectionId}?${v}&reason=${encodeURIComponent("shift over")}`);
    matchesSwagger(one, "/api/hubs/{hub}/connections/{connectionId}", "delete");
    strictEqual(one.status, 200);
    await until(() => closed.has("ann"), 5000, "ann's close");
    ok(closed.get("ann").includes("shift over"), closed.get("ann"));

    const user = await azure("POST", `/api/hubs/chat/users/bob/:closeConnections?${v}`);
    matchesSwagger(user, "/api/hubs/{hub}/users/{user}/:closeConnections", "post");
    strictEqual(user.status, 204);
    await until(() => closed.has("bob"), 5000, "bob's close");

    await azure("PUT", `/api/hubs/chat/groups/g/connections/${cy.connectionId}?${v}`);
    await azure("PUT", `/api/hubs/chat/groups/g/connections/${dee.connectionId}?${v}`);
    const group = await azure("POST", `/api/hubs/chat/groups/g/:closeConnections?${v}&excluded=${dee.connectionId}`);
    matchesSwagger(group, "/api/hubs/{hub}/groups/{group}/:closeConnections", "post");
    strictEqual(group.status, 204);
    await until(() => closed.has("cy"), 5000, "cy's close");
    await sleep(200);
    ok(!closed.has("dee"), "dee was excluded");

    const hub = await azure("POST", `/api/hubs/chat/:closeConnections?${v}`);
    matchesSwagger(hub, "/api/hubs/{hub}/:closeConnections", "post");
    strictEqual(hub.status, 204);
    await until(() => closed.has("dee"), 5000, "dee's close");
  });

  test(":generateToken makes a client token that the client endpoint takes", async () => {
    const reply = await azure("POST", "/api/hubs/Chat/:generateToken?api-version=2024-12-01&userId=eve&minutesToExpire=5");
    matchesSwagger(reply, "/api/hubs/{hub}/:generateToken", "post");
    strictEqual(reply.status, 200);
    deepStrictEqual(Object.keys(reply.body), Object.keys(SWAGGER.definitions.ClientTokenResponse.properties));
    const claims = JSON.parse(Buffer.from(reply.body.token.split(".")[1], "base64url"));
    strictEqual(claims.nameid, "eve");
    strictEqual(claims.aud, `${server.base}/client/?hub=chat`);
    ok(claims.exp - Math.floor(Date.now() / 1000) <= 300);
    // A client connects with it (no app in between) and is eve.
    const eve = new HubConnectionBuilder()
      .withUrl(claims.aud, { accessTokenFactory: () => reply.body.token, transport: HttpTransportType.WebSockets })
      .configureLogging(LogLevel.None)
      .build();
    await eve.start();
    open.push(eve);
    strictEqual((await azure("HEAD", "/api/hubs/chat/users/eve?api-version=2024-12-01")).status, 200);
    await eve.stop();
    strictEqual((await azure("POST", "/api/hubs/chat/:generateToken?api-version=2024-12-01&minutesToExpire=0")).status, 400);
  });

  test(":invoke answers with the client's result, and 404 / 400 in Azure's shapes when it is gone or fails", async () => {
    const v = "api-version=2024-12-01";
    const eve = new HubConnectionBuilder()
      .withUrl(`${server.base}/client/?hub=chat`, { accessTokenFactory: () => sign({ aud: `${server.base}/client/?hub=chat`, nameid: "eve" }), transport: HttpTransportType.WebSockets })
      .configureLogging(LogLevel.None)
      .build();
    eve.on("Weather", (city) => ({ city, sky: "clear" }));
    await eve.start();
    open.push(eve);
    const answered = await azure("POST", `/api/hubs/chat/connections/${eve.connectionId}/:invoke?${v}`, { body: { target: "Weather", arguments: ["Oslo"] } });
    matchesSwagger(answered, "/api/hubs/{hub}/connections/{connectionId}/:invoke", "post");
    strictEqual(answered.status, 200, JSON.stringify(answered.body));
    deepStrictEqual(answered.body.result, { city: "Oslo", sky: "clear" });
    const noHandler = await azure("POST", `/api/hubs/chat/connections/${eve.connectionId}/:invoke?${v}`, { body: { target: "Nothing", arguments: [] } });
    strictEqual(noHandler.status, 400);
    checkErrorDetail(noHandler);
    ok(/didn't provide a result/.test(noHandler.body.message), noHandler.body.message);
    const gone = await azure("POST", `/api/hubs/chat/connections/no-such/:invoke?${v}`, { body: { target: "Weather", arguments: [] } });
    strictEqual(gone.status, 404);
    checkErrorDetail(gone);
    await eve.stop();
  });

  test("errors in Azure's shapes: 401 without or with a bad token, 404, 400, 405", async () => {
    const v = "api-version=2024-12-01";
    const send = "/api/hubs/chat/:send";
    const payload = { body: { target: "news", arguments: [] } };
    // Azure's SDKs sign the audience without the port (their service listens on 443).
    const portless = `${server.base.replace(/:\d+$/, "")}${send}`;
    const signedAsTheSdks = await azure("POST", `${send}?${v}`, { ...payload, token: sign({ aud: portless }) });
    strictEqual(signedAsTheSdks.status, 202, "an audience without the port, as Azure's SDKs sign it");
    const refusals = [
      await azure("POST", `${send}?${v}`, { ...payload, token: null }),
      await azure("POST", `${send}?${v}`, { ...payload, key: "not-the-key" }),
      await azure("POST", `${send}?${v}`, { ...payload, token: sign({ aud: `${server.base}/api/hubs/chat/users/x/:send` }) }),
      await azure("POST", `${send}?${v}`, { ...payload, token: sign({ aud: `${server.base}${send}` }, { expiresIn: -600 }) }),
    ];
    for (const refused of refusals) {
      strictEqual(refused.status, 401);
      checkErrorDetail(refused);
      matchesSwagger(refused, "/api/hubs/{hub}/:send", "post");
    }
    // The key being rotated out still signs valid calls.
    strictEqual((await azure("POST", `${send}?${v}`, { ...payload, key: OLD_KEY })).status, 202);

    const unknown = await azure("PUT", `/api/hubs/chat/groups/g/connections/no-such-connection?${v}`);
    strictEqual(unknown.status, 404);
    checkErrorDetail(unknown);
    ok(swaggerCodes("/api/hubs/{hub}/groups/{group}/connections/{connectionId}", "put").includes(404));

    for (const bad of [
      await azure("POST", `${send}?${v}`, { body: "{not json" }),
      await azure("POST", `${send}?${v}`, { body: { arguments: [1] } }),
      await azure("POST", `${send}?${v}`, { body: { target: "", arguments: [] } }),
      await azure("POST", `${send}`, payload),
      await azure("GET", `/api/hubs/chat/groups/g/connections?${v}&maxpagesize=201`),
      await azure("GET", `/api/hubs/chat/groups/g/connections?${v}&maxpagesize=0`),
      await azure("PUT", `/api/hubs/chat/users/u/groups/g?${v}&ttl=-1`),
      await azure("POST", `/api/hubs/chat/groups/${"g".repeat(300)}/:send?${v}`, payload),
      await azure("POST", `/api/hubs/not.a.hub/:send?${v}`, payload),
    ]) {
      strictEqual(bad.status, 400, JSON.stringify(bad.body));
      checkErrorDetail(bad);
    }
    const wrongMethod = await azure("GET", `${send}?${v}`);
    strictEqual(wrongMethod.status, 405);
    strictEqual(wrongMethod.headers.get("allow"), "POST");
    checkErrorDetail(wrongMethod);

    swaggerCodes("/api/hubs/{hub}/connections/{connectionId}/:invoke", "post");

    // Health needs no token.
    strictEqual((await fetch(`${server.base}/api/health?${v}`, { method: "HEAD" })).status, 200);
    strictEqual((await fetch(`${server.base}/api/v1/health`)).status, 200);
  });

  test("ringhub's own REST API keeps answering beside Azure's", async () => {
    const own = await fetch(`${server.base}/api/hubs/chat/messages`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: JSON.stringify({ target: "news", arguments: [] }),
    });
    strictEqual(own.status, 202);
    // An access-key token is no API key, and the API key is no access-key token.
    const crossed = await fetch(`${server.base}/api/hubs/chat/messages`, {
      method: "POST",
      headers: { authorization: `Bearer ${sign({ aud: `${server.base}/api/hubs/chat/messages` })}`, "content-type": "application/json" },
      body: JSON.stringify({ target: "news", arguments: [] }),
    });
    strictEqual(crossed.status, 401);
    strictEqual((await azure("POST", "/api/hubs/chat/:send?api-version=2024-12-01", { token: API_KEY, body: { target: "news" } })).status, 401);
  });
});

/** A TCP proxy in front of `base`; `cut(holdMs)` drops every connection through it and
 *  holds new ones that long (a stateful client's resume lands after the gap). */
async function tcpProxy(base) {
  const { hostname, port } = new URL(base);
  const pairs = new Set();
  let holdUntil = 0;
  const proxy = createTcpServer((inbound) => {
    inbound.on("error", () => {});
    inbound.pause();
    setTimeout(() => {
      const upstream = createConnection({ host: hostname, port: Number(port) });
      upstream.on("error", () => {});
      const pair = { inbound, upstream };
      pairs.add(pair);
      const end = () => {
        pairs.delete(pair);
        inbound.destroy();
        upstream.destroy();
      };
      inbound.on("close", end);
      upstream.on("close", end);
      inbound.pipe(upstream);
      upstream.pipe(inbound);
      inbound.resume();
    }, Math.max(0, holdUntil - Date.now()));
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  return {
    base: `http://127.0.0.1:${proxy.address().port}`,
    cut(holdMs) {
      holdUntil = Date.now() + holdMs;
      const cut = pairs.size;
      for (const { inbound, upstream } of pairs) {
        inbound.resetAndDestroy();
        upstream.resetAndDestroy();
      }
      pairs.clear();
      return cut;
    },
    close: () => new Promise((resolve) => proxy.close(resolve)),
  };
}

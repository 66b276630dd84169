// The REST API with a real HTTP client (Node's fetch) and stock SignalR clients as
// recipients: every endpoint, its failures, and the OpenAPI document kept true.
import { after, before, describe, test } from "node:test";
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";
import { connect, raw, startServer, sleep, statusOf, token, until } from "./helpers.mjs";

const API_KEY = "rest-key";
let server;
const open = [];
async function client(options = {}) {
  const c = await connect(server.base, options);
  c.on("news", (...args) => c.received.push(args));
  open.push(c);
  return c;
}

async function call(method, path, { body, key = API_KEY, rawBody, headers = {} } = {}) {
  const res = await fetch(`${server.base}${path}`, {
    method,
    headers: {
      ...(key === null ? {} : { authorization: `Bearer ${key}` }),
      "content-type": "application/json",
      ...headers,
    },
    body: rawBody ?? (body === undefined ? undefined : JSON.stringify(body)),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, body: text ? JSON.parse(text) : null };
}

before(async () => {
  server = await startServer(["--threads", "2", "--api-key", API_KEY]);
});
after(async () => {
  await Promise.all(open.map((c) => c.stop().catch(() => {})));
  strictEqual(await server.stop(), 0);
});

describe("sending", () => {
  test("to all, a group (with except), a user-less connection, each once", async () => {
    const [a, b, c] = [await client(), await client(), await client()];
    for (const m of [a, b]) await m.invoke("JoinGroup", "news-room");

    strictEqual((await call("POST", "/api/hubs/chat/messages", { body: { target: "news", arguments: ["all", 1] } })).status, 202);
    await until(() => [a, b, c].every((m) => m.received.length === 1), 3000, "the broadcast");
    deepStrictEqual(c.received[0], ["all", 1]);

    const res = await call("POST", "/api/hubs/chat/groups/news-room/messages", { body: { target: "news", arguments: ["group"], except: [b.connectionId] } });
    strictEqual(res.status, 202);
    await until(() => a.received.length === 2, 3000, "the group message");
    strictEqual((await call("POST", `/api/hubs/chat/connections/${c.connectionId}/messages`, { body: { target: "news", arguments: ["direct"] } })).status, 202);
    await until(() => c.received.length === 2, 3000, "the direct message");
    await sleep(100);
    deepStrictEqual(a.received.map((r) => r[0]), ["all", "group"]);
    deepStrictEqual(b.received.map((r) => r[0]), ["all"], "b was excepted");
    deepStrictEqual(c.received.map((r) => r[0]), ["all", "direct"]);
  });

  test("except works on sends to all and to a user; an unknown query parameter is refused, not ignored", async () => {
    const [a, b] = [await client(), await client()];
    const excluded = await call("POST", `/api/hubs/chat/messages?excluded=${b.connectionId}`, { body: { target: "news", arguments: ["nobody"] } });
    strictEqual(excluded.status, 400);
    ok(excluded.body.error.includes("'excluded'"), excluded.body.error);
    strictEqual((await call("POST", "/api/hubs/chat/messages", { body: { target: "news", arguments: ["not b"], except: [b.connectionId] } })).status, 202);
    await until(() => a.received.some((r) => r[0] === "not b"), 3000, "the send to all");
    await sleep(100);
    ok(!b.received.some((r) => r[0] === "not b" || r[0] === "nobody"), "b was excepted, and the refused send reached nobody");
    ok(!a.received.some((r) => r[0] === "nobody"));

    const secured = await startServer(["--jwt-secret", "test-secret", "--api-key", API_KEY]);
    try {
      const tabs = [];
      for (let i = 0; i < 2; i++) {
        const tab = await connect(secured.base, { accessToken: token({ sub: "u" }) });
        tab.on("news", (...args) => tab.received.push(args));
        tabs.push(tab);
      }
      const res = await fetch(`${secured.base}/api/hubs/chat/users/u/messages`, {
        method: "POST",
        headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
        body: JSON.stringify({ target: "news", arguments: ["other tab"], except: [tabs[0].connectionId] }),
      });
      strictEqual(res.status, 202);
      await until(() => tabs[1].received.length === 1, 3000, "the user's other tab");
      await sleep(100);
      deepStrictEqual(tabs[0].received, [], "the excepted tab");
      await Promise.all(tabs.map((t) => t.stop()));
    } finally {
      await secured.stop();
    }
  });

  test("HEAD /healthz answers 200 without a body", async () => {
    const res = await fetch(`${server.base}/healthz`, { method: "HEAD" });
    strictEqual(res.status, 200);
    strictEqual(await res.text(), "");
  });

  test("arguments default to none; messages to an empty group or unknown user are accepted", async () => {
    const a = await client();
    await a.invoke("JoinGroup", "quiet");
    strictEqual((await call("POST", "/api/hubs/chat/groups/quiet/messages", { body: { target: "news" } })).status, 202);
    await until(() => a.received.length === 1, 3000, "the message without arguments");
    deepStrictEqual(a.received[0], []);
    strictEqual((await call("POST", "/api/hubs/chat/groups/nobody-here/messages", { body: { target: "news", arguments: [] } })).status, 202);
    strictEqual((await call("POST", "/api/hubs/chat/users/nobody/messages", { body: { target: "news", arguments: [] } })).status, 202);
  });
});

describe("membership and presence", () => {
  test("PUT and DELETE a connection in a group take effect before the 204", async () => {
    const a = await client();
    const path = `/api/hubs/chat/groups/ops/connections/${a.connectionId}`;
    strictEqual((await call("PUT", path)).status, 204);
    deepStrictEqual((await call("GET", "/api/hubs/chat/groups/ops")).body, { connections: 1, users: 0, userIds: [] });
    await call("POST", "/api/hubs/chat/groups/ops/messages", { body: { target: "news", arguments: ["in"] } });
    await until(() => a.received.length === 1, 3000, "the group message after PUT");
    strictEqual((await call("DELETE", path)).status, 204);
    strictEqual((await call("DELETE", path)).status, 204, "leaving again is not an error");
    deepStrictEqual((await call("GET", "/api/hubs/chat/groups/ops")).body, { connections: 0, users: 0, userIds: [] });
  });

  test("unknown groups and users answer zeros and empty lists", async () => {
    deepStrictEqual((await call("GET", "/api/hubs/chat/groups/never")).body, { connections: 0, users: 0, userIds: [] });
    deepStrictEqual((await call("GET", "/api/hubs/chat/users/never")).body, { online: false, connectionIds: [], groups: [] });
  });

  test("DELETE a connection closes it with a Close message", async () => {
    const a = await client();
    const closed = new Promise((resolve) => a.onclose((error) => resolve(error ?? "no error")));
    strictEqual((await call("DELETE", `/api/hubs/chat/connections/${a.connectionId}`)).status, 204);
    strictEqual(await closed, "no error");
    strictEqual((await call("DELETE", `/api/hubs/chat/connections/${a.connectionId}`)).status, 404);
  });
});

describe("failures", () => {
  test("401 without or with a wrong key, with an error body", async () => {
    for (const key of [null, "wrong", ""]) {
      const res = await call("GET", "/api/hubs/chat/groups/g", { key });
      strictEqual(res.status, 401);
      strictEqual(typeof res.body.error, "string");
      strictEqual(res.headers.get("www-authenticate"), "Bearer");
    }
  });

  test("404 for unknown connection ids and paths", async () => {
    for (const [method, path] of [
      ["POST", "/api/hubs/chat/connections/nope/messages"],
      ["PUT", "/api/hubs/chat/groups/g/connections/nope"],
      ["DELETE", "/api/hubs/chat/groups/g/connections/nope"],
      ["DELETE", "/api/hubs/chat/connections/nope"],
      ["GET", "/api/hubs/chat/nothing"],
      ["GET", "/api/elsewhere"],
    ]) {
      const res = await call(method, path, { body: method === "POST" ? { target: "t", arguments: [] } : undefined });
      strictEqual(res.status, 404, `${method} ${path}`);
      ok(res.body.error.length > 0);
    }
  });

  test("400 on malformed JSON, wrong shapes and bad hub names; 405 with Allow", async () => {
    const bad = [
      { rawBody: "{not json" },
      { rawBody: "" },
      { body: [1, 2] },
      { body: { arguments: [] } },
      { body: { target: "", arguments: [] } },
      { body: { target: 5, arguments: [] } },
      { body: { target: "t", arguments: "x" } },
      { body: { target: "t", arguments: [], surprise: 1 } },
    ];
    for (const options of bad) {
      const res = await call("POST", "/api/hubs/chat/messages", options);
      strictEqual(res.status, 400, JSON.stringify(options));
      ok(res.body.error.length > 0);
    }
    const except = await call("POST", "/api/hubs/chat/connections/x/messages", { body: { target: "t", except: ["x"] } });
    ok([400, 404].includes(except.status), "except does not apply to one connection");
    strictEqual((await call("GET", "/api/hubs/bad%20name/groups/g")).status, 400);
    const wrong = await call("GET", "/api/hubs/chat/messages");
    strictEqual(wrong.status, 405);
    strictEqual(wrong.headers.get("allow"), "POST");
  });

  test("a message over half of --max-buffered-bytes gets 413 naming the limit, and reaches nobody", async () => {
    const a = await client();
    await a.invoke("JoinGroup", "big-room");
    const res = await call("POST", "/api/hubs/chat/groups/big-room/messages", { body: { target: "news", arguments: ["x".repeat(600000)] } });
    strictEqual(res.status, 413);
    ok(res.body.error.includes("524288"), res.body.error);
    strictEqual(await a.invoke("Echo", "still connected"), "still connected");
    deepStrictEqual(a.received, []);
  });

  test("a body over the limit gets 413 and the server keeps serving", async () => {
    const res = await call("POST", "/api/hubs/chat/messages", { rawBody: JSON.stringify({ target: "t", arguments: ["x".repeat(1100000)] }) });
    strictEqual(res.status, 413);
    ok(res.body.error.includes("1048576"));
    strictEqual((await call("GET", "/api/hubs/chat/groups/g")).status, 200);
  });

  test("keep-alive: several requests on one connection", async () => {
    const request = (path) => `GET ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\n\r\n`;
    const answer = (await raw(server.base, request("/api/hubs/chat/groups/a") + request("/api/hubs/chat/users/b"), 500)).toString();
    strictEqual(answer.match(/HTTP\/1\.1 200/g)?.length, 2, answer);
  });

  test("without --api-key the REST API is off", async () => {
    const plain = await startServer([]);
    try {
      const res = await fetch(`${plain.base}/api/hubs/chat/groups/g`, { headers: { authorization: "Bearer x" } });
      strictEqual(res.status, 404);
      ok((await res.json()).error.includes("--api-key"));
    } finally {
      await plain.stop();
    }
  });
});

describe("the OpenAPI document", () => {
  const fill = (path, ids) => path.replace(/\{(\w+)\}/g, (_, name) => ids[name] ?? "x");

  test("every documented operation exists and answers only documented statuses", async () => {
    const doc = (await call("GET", "/api/openapi.json", { key: null })).body;
    ok(doc.openapi.startsWith("3."));
    const a = await client();
    const ids = { hub: "chat", group: "doc-group", user: "doc-user", connectionId: a.connectionId };
    // Closing the connection goes last, since the other operations use it.
    const all = Object.entries(doc.paths).flatMap(([path, item]) =>
      ["get", "put", "post", "delete"].filter((m) => item[m]).map((method) => ({ path, item, method, operation: item[method] })),
    );
    all.sort((x, y) => (x.operation.operationId === "closeConnection") - (y.operation.operationId === "closeConnection"));
    let operations = 0;
    for (const { path, item, method, operation } of all) {
      {
        operations++;
        const hasBody = operation.requestBody !== undefined;
        const url = fill(path, ids);
        const documented = Object.keys(operation.responses).map(Number);
        const good = await call(method.toUpperCase(), url, { body: hasBody ? { target: "news", arguments: [] } : undefined });
        const success = documented.filter((s) => s < 300);
        ok(success.includes(good.status), `${method} ${url}: ${good.status} not in ${success}: ${JSON.stringify(good.body)}`);
        if (operation.security?.length) {
          const unauthorized = await call(method.toUpperCase(), url, { key: "wrong" });
          strictEqual(unauthorized.status, 401, `${method} ${path}`);
          ok(documented.includes(401), `${method} ${path} documents 401`);
        }
        if (hasBody) {
          const bad = await call(method.toUpperCase(), url, { rawBody: "{" });
          ok(documented.includes(bad.status) && bad.status === 400, `${method} ${path}: ${bad.status}`);
        }
        // Methods a path does not document are refused.
        for (const other of ["get", "put", "post", "delete"].filter((m) => !item[m])) {
          const res = await call(other.toUpperCase(), url);
          ok([404, 405].includes(res.status), `${other} ${path} answered ${res.status}`);
        }
      }
    }
    strictEqual(operations, 12, "every endpoint of the contract is documented");
    // The connection was closed by the documented DELETE; a 404 is documented for that case.
    const gone = await call("DELETE", fill("/api/hubs/{hub}/connections/{connectionId}", ids));
    strictEqual(gone.status, 404);
    ok("404" in doc.paths["/api/hubs/{hub}/connections/{connectionId}"].delete.responses);
  });
});

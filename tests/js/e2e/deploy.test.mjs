// What a deployment sets around the hub (issue 23): --listen with a host name, an
// allow-list of browser origins (--cors-origins), and metrics and the REST document on
// an address of their own (--admin-listen).
import { test } from "node:test";
import { ok, strictEqual, match } from "node:assert/strict";
import { ONCE, connect, raw, sleep, startServer, statusOf, upgradeRequest, until } from "./helpers.mjs";

test("--listen takes a host name", { skip: ONCE }, async () => {
  const server = await startServer([], { listen: "localhost:0" });
  try {
    match(server.base, /^http:\/\/127\.0\.0\.1:\d+$/);
    const client = await connect(server.base);
    strictEqual(await client.invoke("Echo", "here"), "here");
    await client.stop();
  } finally {
    await server.stop();
  }
});

test("--cors-origins: only the listed origins get CORS answers, and other origins' WebSockets are refused", { skip: ONCE }, async () => {
  const app = "https://app.example.com";
  const server = await startServer(["--cors-origins", `${app}, http://localhost:8080`]);
  try {
    const negotiate = (origin) =>
      fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST", headers: { origin } });
    const allowed = await negotiate(app);
    strictEqual(allowed.status, 200);
    strictEqual(allowed.headers.get("access-control-allow-origin"), app);
    const other = await negotiate("https://evil.example.com");
    strictEqual(other.headers.get("access-control-allow-origin"), null, "no CORS answer for another origin");
    const upgrade = (origin) => raw(server.base, upgradeRequest("/hubs/chat", origin ? { Origin: origin } : {}), 500);
    strictEqual(statusOf(await upgrade("https://evil.example.com")), 403);
    strictEqual(statusOf(await upgrade(app)), 101);
    strictEqual(statusOf(await upgrade(null)), 101, "non-browser clients send no Origin");
  } finally {
    await server.stop();
  }
});

test("--admin-listen moves /metrics and /api/openapi.json off the public address", { skip: ONCE }, async () => {
  const server = await startServer(["--admin-listen", "127.0.0.1:0", "--api-key", "k"]);
  try {
    await until(() => /admin address address=\S+/.test(server.log()), 5000, "the admin address logged");
    const admin = `http://${/admin address address=(\S+)/.exec(server.log())[1]}`;
    strictEqual((await fetch(`${server.base}/metrics`)).status, 404);
    strictEqual((await fetch(`${server.base}/api/openapi.json`)).status, 404);
    const metrics = await fetch(`${admin}/metrics`);
    strictEqual(metrics.status, 200);
    ok((await metrics.text()).includes("ringhub_connections{shard="));
    strictEqual((await fetch(`${admin}/api/openapi.json`)).status, 200);
    for (const base of [server.base, admin]) {
      strictEqual((await fetch(`${base}/healthz`)).status, 200);
      strictEqual((await fetch(`${base}/readyz`)).status, 200);
    }
    strictEqual((await fetch(`${admin}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST" })).status, 404, "no hub there");
    strictEqual(await server.stop(), 0);
    await sleep(100);
    ok(await fetch(`${admin}/healthz`).then(() => false, () => true), "the admin address closes with the node");
  } finally {
    await server.stop();
  }
});

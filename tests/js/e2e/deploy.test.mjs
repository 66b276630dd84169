// What a deployment sets around the hub (issue 23): --listen with a host name, an
// allow-list of browser origins (--cors-origins), metrics and the REST document on an
// address of their own (--admin-listen), and a container that denies io_uring.
import { spawn } from "node:child_process";
import { test } from "node:test";
import { ok, strictEqual, match } from "node:assert/strict";
import { HttpTransportType } from "@microsoft/signalr";
import { BINARY, ONCE, connect, metric, raw, sleep, startServer, statusOf, tempDataDir, token, upgradeRequest, until } from "./helpers.mjs";

/** Runs the server as a default Docker container (seccomp profile of Docker 25+) would:
 *  io_uring's system calls fail with EPERM. */
const DENY_IO_URING = new URL("../deny_io_uring.py", import.meta.url).pathname;

test("where io_uring is denied (a default container), the server says so and what to do, and serves all three transports on epoll", { skip: ONCE, timeout: 60000 }, async () => {
  const server = await startServer([], { binary: "python3", command: [DENY_IO_URING, BINARY, "serve"] });
  try {
    const warning = server.log().split("\n").find((line) => line.includes("io_uring is not available"));
    ok(warning, `a warning at startup:\n${server.log()}`);
    match(warning, /WARN/);
    match(warning, /Operation not permitted/);
    match(warning, /seccomp/);
    ok(server.log().indexOf("io_uring is not available") < server.log().indexOf("listening"), "said before listening");
    strictEqual(await metric(server.base, "ringhub_io_uring"), 0);
    const res = await fetch(`${server.base}/healthz`, { signal: AbortSignal.timeout(2000) });
    strictEqual(res.status, 200);
    const clients = [];
    for (const transport of [HttpTransportType.WebSockets, HttpTransportType.ServerSentEvents, HttpTransportType.LongPolling]) {
      const client = await connect(server.base, { transport });
      await client.invoke("JoinGroup", "denied");
      clients.push(client);
    }
    await clients[0].invoke("SendToGroup", "denied", "receive", ["on epoll"]);
    await until(() => clients.every((c) => c.received.length === 1), 5000, "every transport got the send");
    for (const client of clients) strictEqual(client.received[0][0], "on epoll");
    await Promise.all(clients.map((c) => c.stop()));
  } finally {
    await server.stop();
  }
});

test("--io-driver io-uring where io_uring is denied: exits before listening, with the cause and the fix", { skip: ONCE, timeout: 30000 }, async () => {
  const child = spawn("python3", [DENY_IO_URING, BINARY, "serve", "--listen", "127.0.0.1:0", "--data", tempDataDir(), "--io-driver", "io-uring"], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr.on("data", (chunk) => (log += chunk));
  const code = await new Promise((resolve) => child.on("exit", resolve));
  ok(code !== 0, `exit code ${code}`);
  match(log, /--io-driver io-uring: io_uring is not available \(Operation not permitted/);
  match(log, /seccomp/);
  ok(!log.includes("listening"), log);
});

test("on a kernel that allows io_uring the shards use it", { skip: ONCE }, async () => {
  const server = await startServer();
  try {
    strictEqual(await metric(server.base, "ringhub_io_uring"), 1);
    ok(!server.log().includes("io_uring is not available"));
  } finally {
    await server.stop();
  }
});

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

test("a brand-new data directory is not 'upgraded'; a second node on the same --data is told to give each node its own", { skip: ONCE, timeout: 30000 }, async () => {
  const data = tempDataDir();
  const first = await startServer(["--data", data]);
  try {
    ok(!first.log().includes("upgraded"), first.log());
    const second = spawn(BINARY, ["serve", "--listen", "127.0.0.1:0", "--data", data], { stdio: ["ignore", "ignore", "pipe"] });
    let log = "";
    second.stderr.on("data", (chunk) => (log += chunk));
    const code = await new Promise((resolve) => second.on("exit", resolve));
    ok(code !== 0, `exit code ${code}`);
    match(log, /--data: the membership store .*membership\.redb is open in another process/);
    match(log, /give each node its own --data directory/);
  } finally {
    await first.stop();
  }
});

test("connection logs say who, from where and why it ended; connects and refused tokens are counted", { skip: ONCE, timeout: 30000 }, async () => {
  const server = await startServer(["--jwt-secret", "test-secret"], { env: { RUST_LOG: "info,ringhub_engine=debug" } });
  try {
    const refused = await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST", headers: { authorization: "Bearer nonsense" } });
    strictEqual(refused.status, 401);
    strictEqual(await metric(server.base, "ringhub_auth_failures_total"), 1);
    const client = await connect(server.base, { accessToken: token({ sub: "ann" }) });
    strictEqual(await metric(server.base, "ringhub_connects_total"), 1);
    const id = client.connectionId;
    await client.stop();
    await until(() => server.log().includes(`connection=${id}`) && /disconnected/.test(server.log().split("\n").filter((l) => l.includes(id)).join("\n")), 5000, "the disconnected line");
    const lines = server.log().replace(/\x1b\[[0-9;]*m/g, "").split("\n").filter((line) => line.includes(id));
    const connected = lines.find((line) => line.includes("connected") && !line.includes("disconnected"));
    match(connected, /user="?ann"?/);
    match(connected, /remote=127\.0\.0\.1:\d+/);
    const disconnected = lines.find((line) => line.includes("disconnected"));
    match(disconnected, /user="?ann"?/);
    match(disconnected, /reason=ClientClosed/);
    match(server.log(), /access token refused/);
  } finally {
    await server.stop();
  }
});

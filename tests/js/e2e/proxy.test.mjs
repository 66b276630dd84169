// ringhub behind nginx as the README's "Deploying" section sets it up
// (deploy/nginx/ringhub-locations.conf): TLS at the proxy, two nodes sharing a Redis,
// connections kept on one node by their `id` (SSE and long polling need that), and the
// stock client through it on all three transports.
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ok, strictEqual } from "node:assert/strict";
import { HttpTransportType } from "@microsoft/signalr";
import { ONCE, connect, freePort, metric, sleep, startRedis, startServer, until } from "./helpers.mjs";

const LOCATIONS = new URL("../../../deploy/nginx/ringhub-locations.conf", import.meta.url).pathname;

/** nginx (Debian's, installed by .ci/run) terminating TLS in front of `nodes`. */
async function startNginx(nodes) {
  const dir = mkdtempSync(join(tmpdir(), "ringhub-nginx-"));
  execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem")], { stdio: "ignore" });
  const port = await freePort();
  const servers = nodes.map((base) => `server ${new URL(base).host};`).join(" ");
  writeFileSync(join(dir, "nginx.conf"), `
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  map $http_upgrade $connection_upgrade { default upgrade; "" ""; }
  upstream ringhub { hash $arg_id consistent; ${servers} keepalive 32; }
  server {
    listen 127.0.0.1:${port} ssl;
    ssl_certificate ${dir}/cert.pem;
    ssl_certificate_key ${dir}/key.pem;
    include ${LOCATIONS};
  }
}
`);
  const child = spawn("nginx", ["-p", dir, "-c", join(dir, "nginx.conf"), "-g", "daemon off;"], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr.on("data", (chunk) => (log += chunk));
  const base = `https://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    const res = await fetch(`${base}/healthz`).catch(() => null);
    if (res?.status === 200) break;
    if (i === 200 || child.exitCode !== null) throw new Error(`nginx did not start: ${log}${readFileSync(join(dir, "error.log"), "utf8")}`);
    await sleep(25);
  }
  return {
    base,
    stop: () => {
      child.kill("SIGTERM");
      return new Promise((resolve) => (child.exitCode !== null ? resolve() : child.on("exit", resolve)));
    },
  };
}

test("through nginx with TLS in front of two nodes: WebSockets, SSE and long polling each reach the group from either node, unbuffered", { skip: ONCE, timeout: 120000 }, async () => {
  // The proxy's certificate is self-signed (a test's own).
  process.env.NODE_TLS_REJECT_UNAUTHORIZED = "0";
  const redis = await startRedis();
  const nodes = [await startServer(["--redis", redis.url]), await startServer(["--redis", redis.url])];
  const nginx = await startNginx(nodes.map((n) => n.base));
  const clients = [];
  try {
    const connections = () => Promise.all(nodes.map((n) => metric(n.base, "ringhub_connections")));
    const names = { [HttpTransportType.WebSockets]: "WebSockets", [HttpTransportType.ServerSentEvents]: "SSE", [HttpTransportType.LongPolling]: "long polling" };
    const members = [];
    for (const transport of [HttpTransportType.WebSockets, HttpTransportType.ServerSentEvents, HttpTransportType.LongPolling]) {
      // Clients until this transport has one on each node (the hash of `id` decides).
      const before = await connections();
      let onEach = false;
      for (let i = 0; i < 24 && !onEach; i++) {
        const client = await connect(nginx.base, { transport });
        client.transportName = names[transport];
        clients.push(client);
        await client.invoke("JoinGroup", "via-proxy");
        members.push(client);
        const now = await connections();
        onEach = now.every((count, n) => count > before[n]);
      }
      ok(onEach, `${names[transport]} clients on both nodes`);
    }
    const sender = members[0];
    const started = Date.now();
    for (let i = 0; i < 5; i++) await sender.invoke("SendToGroup", "via-proxy", "receive", [i]);
    await until(() => members.every((m) => m.received.length === 5), 5000, "every member got the five sends");
    const took = Date.now() - started;
    for (const m of members) strictEqual(JSON.stringify(m.received.map((r) => r[0])), "[0,1,2,3,4]", `${m.transportName}: in order, once`);
    ok(took < 3000, `delivered through the proxy in ${took} ms (an SSE stream buffered by the proxy would hold them)`);
    // A long-polling client keeps its connection across polls, through the proxy.
    const poller = members.find((m) => m.transportName === "long polling");
    await sleep(1500);
    strictEqual(await poller.invoke("Echo", "still here"), "still here");
    console.log(`# ${members.length} members through nginx (TLS) on two nodes; five sends reached all in ${took} ms`);
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await nginx.stop();
    for (const node of nodes) await node.stop();
    await redis.stop();
  }
});

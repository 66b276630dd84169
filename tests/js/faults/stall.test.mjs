// A host stall: the node's process does not run for 7 s (SIGSTOP, then SIGCONT: a
// frozen VM, a live migration, a long GC-like pause of the host). Its clients did
// nothing wrong: none of them may be closed for it, whatever their transport.
//
// The timeouts are scaled down from the defaults (15 s keep-alive, 30 s client timeout)
// so that a 7 s stall is longer than the client timeout, as a 35 s stall is at the
// defaults; the stock clients keep alive at the server's interval, as they do by
// default (their 15 s keep-alive against the server's default 15 s).
import { after, before, test } from "node:test";
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";
import { sleep, startServer, until } from "../e2e/helpers.mjs";
import { appClient, HttpTransportType, rest, API_KEY, SECRET } from "./faults.mjs";

const KEEPALIVE_SECS = 2;
const CLIENT_TIMEOUT_SECS = 5;
const STALL_MS = 7000;

let server;
const clients = [];
before(async () => {
  server = await startServer([
    "--jwt-secret", SECRET, "--api-key", API_KEY,
    "--keepalive-secs", String(KEEPALIVE_SECS), "--client-timeout-secs", String(CLIENT_TIMEOUT_SECS),
  ]);
});
after(async () => {
  await Promise.all(clients.map((c) => c.stop().catch(() => {})));
  await server?.stop();
});

test("a 7 s stall of the node closes none of its WebSocket, SSE and long-polling clients", async () => {
  const transports = {
    WebSockets: HttpTransportType.WebSockets,
    ServerSentEvents: HttpTransportType.ServerSentEvents,
    LongPolling: HttpTransportType.LongPolling,
  };
  const byTransport = {};
  for (const [name, transport] of Object.entries(transports)) {
    byTransport[name] = [];
    for (let i = 0; i < 7; i++) {
      const c = await appClient(server.base, `${name}-${i}`, {
        transport,
        keepAliveMs: KEEPALIVE_SECS * 1000,
        // No automatic reconnect here: a close must show, not be papered over.
        reconnectDelays: [],
        setup: async (conn) => conn.invoke("JoinGroup", "everyone"),
      });
      clients.push(c);
      byTransport[name].push(c);
    }
  }
  // Idle for longer than the client timeout first: the keep-alive works both ways.
  await sleep((CLIENT_TIMEOUT_SECS + 1) * 1000);
  strictEqual(clients.filter((c) => c.closedWith).length, 0, "idle clients stay connected");

  server.child.kill("SIGSTOP");
  await sleep(STALL_MS);
  server.child.kill("SIGCONT");
  // Long enough for a client timeout to be judged several times over.
  await sleep((CLIENT_TIMEOUT_SECS + 3) * 1000);

  const closed = Object.fromEntries(
    Object.entries(byTransport).map(([name, list]) => [name, list.filter((c) => c.closedWith || c.state !== "Connected").length]),
  );
  deepStrictEqual(closed, { WebSockets: 0, ServerSentEvents: 0, LongPolling: 0 }, "clients closed after the stall");
  // And they are served: a send reaches every one of them.
  strictEqual((await rest(server.base, "POST", "/api/hubs/chat/groups/everyone/messages", { target: "receive", arguments: ["after"] })).status, 202);
  await until(() => clients.every((c) => c.received.includes("after")), 5000, "a send after the stall reaching everyone");
  const timeouts = Number(/^ringhub_client_timeouts_total (\d+)$/m.exec(await (await fetch(`${server.base}/metrics`)).text())?.[1]);
  ok(timeouts === 0, `ringhub_client_timeouts_total is ${timeouts}`);
});

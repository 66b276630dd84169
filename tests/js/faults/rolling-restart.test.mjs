// A rolling restart of a 3-node cluster behind a round-robin TCP load balancer: each
// node in turn is stopped with SIGTERM (as a deployment does) and started again with
// the same flags, while a backend keeps sending to a group through REST. Stock clients
// with automatic reconnect come back on whichever node the balancer picks, and their
// users' durable groups take them in again without the app doing anything.
import { after, before, test } from "node:test";
import { ok, strictEqual } from "node:assert/strict";
import { sleep, startRedis, until } from "../e2e/helpers.mjs";
import { HttpTransportType, appClient, clusterNode, eventually, numbersFrom, readiness, rest, tcpProxy } from "./faults.mjs";

const USERS = 6;

let redis;
let proxy;
const nodes = [];
const clients = [];
before(async () => {
  redis = await startRedis();
  for (let i = 0; i < 3; i++) nodes.push(await clusterNode(redis.url));
  proxy = await tcpProxy(nodes.map((n) => n.base));
});
after(async () => {
  await Promise.all(clients.map((c) => c.stop().catch(() => {})));
  for (const n of nodes) await n.stop();
  await proxy?.close();
  await redis?.stop();
});

test("clients come back from each node's graceful restart, in their durable groups", async () => {
  for (let i = 0; i < USERS; i++) {
    strictEqual((await rest(proxy.base, "PUT", `/api/hubs/chat/groups/team/users/member-${i}`)).status, 204);
  }
  for (let i = 0; i < USERS; i++) {
    // WebSockets: behind a balancer without sticky sessions (contract section 7).
    clients.push(await appClient(proxy.base, `member-${i}`, { transport: HttpTransportType.WebSockets }));
  }
  // A backend sends to the group through the balancer, numbered.
  let sent = 0;
  let sending = true;
  const backend = (async () => {
    while (sending) {
      const { status } = await rest(proxy.base, "POST", "/api/hubs/chat/groups/team/messages", { target: "receive", arguments: [`rest:${sent}`] }).catch(() => ({ status: 0 }));
      if (status === 202) sent++;
      await sleep(50);
    }
  })();
  await until(() => clients.every((c) => c.received.length > 3), 10_000, "every member receiving before the restarts");

  for (const node of nodes) {
    await node.stopAndRestart();
    await eventually(async () => (await readiness(node.base)).status === 200, 10_000, "the restarted node ready");
    await sleep(1000);
  }
  await eventually(async () => clients.every((c) => c.state === "Connected"), 20_000, "every client connected again");
  ok(clients.every((c) => !c.closedWith), "no client gave up");
  ok(clients.some((c) => c.reconnects > 0), "the restarts moved clients");

  // Each is in its durable group again: a send after the restarts reaches everyone.
  const mark = sent;
  await until(() => clients.every((c) => numbersFrom(c, "rest").some((n) => n >= mark)), 10_000, "every member receiving after the restarts");
  await eventually(async () => (await rest(proxy.base, "GET", "/api/hubs/chat/groups/team")).body.connections === USERS, 5000, "the group counting every member once");
  sending = false;
  await backend;
  for (const c of clients) {
    const numbers = numbersFrom(c, "rest");
    ok(numbers.every((n, i) => i === 0 || n > numbers[i - 1]), "in order, nothing twice");
  }
});

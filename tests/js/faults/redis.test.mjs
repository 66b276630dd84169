// What Redis does to a cluster in production (contract section 7): it is not there when
// a node starts, it is killed and comes back, it hangs (SIGSTOP: the connections stay
// up and nothing answers, as with a frozen VM or a long blocking command), and the
// network in front of it stops forwarding without closing anything (a partition without
// RST). Through all of them local delivery keeps its rate, handshakes do not wait on
// Redis, the node says it is not ready and why, and once Redis is back cross-node sends
// resume within 10 s and the connections made meanwhile are in their durable groups.
import { after, describe, test } from "node:test";
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";
import { freePort, metric, sleep, startRedis, startServer, until } from "../e2e/helpers.mjs";
import {
  API_KEY, SECRET, appClient, clusterNode, eventually, numbersFrom, rateOver, readiness, rest, steadySender, tcpProxy,
} from "./faults.mjs";

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

/** Two nodes sharing `redisUrl`, a room with a member on each, a publisher on the first
 *  sending as fast as its Completions come back, and a user with a durable group. */
async function cluster(redisUrl) {
  const a = await clusterNode(redisUrl);
  const b = await clusterNode(redisUrl);
  cleanups.push(() => a.stop(), () => b.stop());
  await eventually(async () => (await metric(a.base, "ringhub_backplane_connected")) === 1 && (await metric(b.base, "ringhub_backplane_connected")) === 1, 10_000, "both nodes connected to Redis");
  const join = (group) => async (c) => c.invoke("JoinGroup", group);
  const local = await appClient(a.base, "lou", { setup: join("room") });
  const remote = await appClient(b.base, "rex", { setup: join("room"), msgpack: true });
  const sender = await appClient(a.base, "sam");
  cleanups.push(() => local.stop(), () => remote.stop(), () => sender.stop());
  strictEqual((await rest(b.base, "PUT", "/api/hubs/chat/groups/ward/users/dana")).status, 204);
  const publisher = steadySender(sender, "room", 0);
  await until(() => remote.received.length > 50, 5000, "cross-node traffic before the fault");
  return { a, b, local, remote, publisher };
}

/** Runs one outage: `fail()` starts it, `heal()` ends it after `downMs`. */
async function outage({ redisUrl, fail, heal, downMs }) {
  const { a, b, local, remote, publisher } = await cluster(redisUrl);
  const before = await rateOver(local, 2000);
  fail();
  const failedAt = Date.now();
  // The node notices within a few seconds, and says so.
  const noticed = await eventually(async () => (await metric(a.base, "ringhub_backplane_connected")) === 0, 5000, "a notices Redis is gone");
  strictEqual((await fetch(`${a.base}/healthz`)).status, 200, "alive all the same");
  // A handshake does not wait on Redis; the user has a durable group it cannot read now.
  const connectStarted = Date.now();
  const dana = await appClient(a.base, "dana");
  cleanups.push(() => dana.stop());
  const handshakeMs = Date.now() - connectStarted;
  ok(handshakeMs < 3000, `a new connection took ${handshakeMs} ms`);
  // Local delivery keeps its rate for the rest of the outage.
  const remaining = downMs - (Date.now() - failedAt) - 500;
  const during = await rateOver(local, Math.max(remaining, 1000));
  ok(during >= before * 0.5, `local delivery: ${Math.round(during)}/s during the outage, ${Math.round(before)}/s before`);
  const ready = await readiness(a.base);
  strictEqual(ready.status, 503, "/readyz while Redis is unreachable");
  ok(typeof ready.body?.reason === "string" && /redis/i.test(ready.body.reason), JSON.stringify(ready.body));
  await heal();
  const healedAt = Date.now();
  // Cross-node delivery is back within 10 s, and the connection made meanwhile is in its
  // durable group (a send to the group from its own node reaches it).
  const mark = publisher.label;
  const sentAtHeal = publisher.sent;
  await until(() => numbersFrom(remote, mark).some((n) => n > sentAtHeal), 10_000, "cross-node delivery back");
  const crossBack = Date.now() - healedAt;
  await eventually(async () => {
    await rest(a.base, "POST", "/api/hubs/chat/groups/ward/messages", { target: "receive", arguments: ["ward-news"] });
    await sleep(200);
    return dana.received.includes("ward-news");
  }, 10_000, "the connection made during the outage to be in its durable group");
  const durableBack = Date.now() - healedAt;
  await eventually(async () => (await readiness(a.base)).status === 200, 10_000, "ready again");
  ok((await metric(a.base, "ringhub_backplane_reconnects_total")) >= 1, "the reconnect is counted");
  await publisher.stop();
  await sleep(500);
  // Local delivery lost nothing; every member got each message once, in order.
  deepStrictEqual(numbersFrom(local, mark), [...Array(publisher.sent).keys()], "every local message, once, in order");
  const far = numbersFrom(remote, mark);
  ok(far.every((n, i) => i === 0 || n > far[i - 1]), "remote: in order, nothing twice");
  return { noticed, handshakeMs, before, during, crossBack, durableBack, a, b };
}

describe("Redis faults", () => {
  test("Redis absent at start, then started: a WARN naming it within 2 s, not ready meanwhile, then a full member", async () => {
    const port = await freePort();
    const redis = await startRedis({ started: false, port });
    cleanups.push(() => redis.stop());
    const node = await startServer(["--redis", redis.url, "--jwt-secret", SECRET, "--api-key", API_KEY]);
    cleanups.push(() => node.stop());
    const startedAt = Date.now();
    await until(() => /WARN.*127\.0\.0\.1:\d+/.test(node.log()), 2500, "a WARN naming the Redis address");
    ok(Date.now() - startedAt <= 2500);
    const warn = node.log().split("\n").find((l) => /WARN.*127\.0\.0\.1/.test(l));
    ok(warn.includes(`127.0.0.1:${port}`), warn);
    ok(/refused|connect/i.test(warn), `the error is named: ${warn}`);
    const ready = await readiness(node.base);
    strictEqual(ready.status, 503);
    strictEqual((await fetch(`${node.base}/healthz`)).status, 200);
    // Local delivery works meanwhile.
    const c = await appClient(node.base, "early", { setup: async (conn) => conn.invoke("JoinGroup", "g") });
    cleanups.push(() => c.stop());
    await c.invoke("SendToGroup", "g", "receive", ["local"]);
    await until(() => c.received.includes("local"), 2000, "local delivery without Redis");
    // While it stays down, at most one more line per 10 s.
    await sleep(11_000);
    const warnings = node.log().split("\n").filter((l) => /WARN/.test(l) && /redis/i.test(l));
    ok(warnings.length >= 2 && warnings.length <= 3, `WARN lines about Redis in 13 s: ${warnings.length}\n${warnings.join("\n")}`);
    await redis.start();
    await eventually(async () => (await readiness(node.base)).status === 200, 10_000, "ready once Redis is there");
    ok(/INFO.*Redis/.test(node.log()), "an INFO when connected");
    const other = await clusterNode(redis.url);
    cleanups.push(() => other.stop());
    const far = await appClient(other.base, "far", { setup: async (conn) => conn.invoke("JoinGroup", "g") });
    cleanups.push(() => far.stop());
    await c.invoke("SendToGroup", "g", "receive", ["cross"]);
    await until(() => far.received.includes("cross"), 5000, "a send to the other node");
    await c.stop();
    strictEqual(await node.stop(), 0);
    ok(!/Attempted to quit|already stopped/.test(node.log()), "no driver noise at shutdown");
  });

  test("Redis killed for 6 s, then started again (with its data)", async () => {
    const redis = await startRedis({ persistent: true });
    cleanups.push(() => redis.stop());
    const r = await outage({ redisUrl: redis.url, fail: () => redis.kill(), heal: () => redis.start(), downMs: 6000 });
    console.log(`killed: noticed in ${r.noticed} ms, handshake ${r.handshakeMs} ms, local ${Math.round(r.during)}/s (before ${Math.round(r.before)}/s), cross-node back ${r.crossBack} ms, durable ${r.durableBack} ms`);
  });

  test("Redis paused 30 s (SIGSTOP: connections up, no answers)", async () => {
    const redis = await startRedis();
    cleanups.push(() => redis.stop());
    const r = await outage({ redisUrl: redis.url, fail: () => redis.pause(), heal: () => redis.resume(), downMs: 30_000 });
    console.log(`paused: noticed in ${r.noticed} ms, handshake ${r.handshakeMs} ms, local ${Math.round(r.during)}/s (before ${Math.round(r.before)}/s), cross-node back ${r.crossBack} ms, durable ${r.durableBack} ms`);
  });

  test("the network in front of Redis stops forwarding without closing for 15 s", async () => {
    const redis = await startRedis();
    cleanups.push(() => redis.stop());
    const proxy = await tcpProxy([`127.0.0.1:${redis.port}`]);
    cleanups.push(() => proxy.close());
    const r = await outage({ redisUrl: proxy.redisUrl, fail: () => proxy.blackhole(), heal: () => proxy.heal(), downMs: 15_000 });
    console.log(`black hole: noticed in ${r.noticed} ms, handshake ${r.handshakeMs} ms, local ${Math.round(r.during)}/s (before ${Math.round(r.before)}/s), cross-node back ${r.crossBack} ms, durable ${r.durableBack} ms`);
  });
});

// Presence and durable membership with the stock client: counts after clean and abrupt
// disconnects, WatchPresence events, and durable groups across a real restart.
import { after, before, describe, test } from "node:test";
import { deepStrictEqual, ok, rejects, strictEqual } from "node:assert/strict";
import { spawn } from "node:child_process";
import { createConnection } from "node:net";
import { TRANSPORT, clientFrame, connect, startServer, sleep, tempDataDir, token, until, upgradeRequest } from "./helpers.mjs";

const SECRET = "test-secret";
const API_KEY = "rest-key";
const admin = token({ sub: "admin", role: "admin" });
const user = (sub, groups = ["*"]) => token({ sub, groups });

let server;
const open = [];
async function client(options = {}) {
  const c = await connect(server.base, options);
  open.push(c);
  return c;
}

before(async () => {
  server = await startServer([
    "--threads", "2",
    "--jwt-secret", SECRET,
    "--api-key", API_KEY,
    "--keepalive-secs", "1",
    "--client-timeout-secs", "2",
    "--disconnect-timeout-secs", "2",
  ]);
});
after(async () => {
  await Promise.all(open.map((c) => c.stop().catch(() => {})));
  strictEqual(await server.stop(), 0);
});

/** Asks GroupCount until the group has `connections` (or `ms` pass); returns the last
 *  counts and how long it took. */
async function pollCount(watcher, group, connections, ms) {
  const started = Date.now();
  let counts;
  while (Date.now() - started < ms) {
    counts = await watcher.invoke("GroupCount", group);
    if (counts.connections === connections) break;
    await sleep(20);
  }
  return { counts, took: Date.now() - started };
}

describe("GroupCount and IsUserOnline", () => {
  test("count connections and distinct users over both shards, and drop at once on stop", async () => {
    const ann1 = await client({ accessToken: user("ann") });
    const ann2 = await client({ accessToken: user("ann") });
    const bob = await client({ accessToken: user("bob") });
    const watcher = await client({ accessToken: admin });
    for (const c of [ann1, ann2, bob]) await c.invoke("JoinGroup", "room");
    deepStrictEqual(await watcher.invoke("GroupCount", "room"), { connections: 3, users: 2 });
    strictEqual(await watcher.invoke("IsUserOnline", "ann"), true);

    // The stock client's stop() resolves once it has sent its close, without waiting
    // for the server, and the watcher may sit on the other shard: so "at once" means
    // within a few hundred milliseconds, not before the next call.
    await ann1.stop();
    const afterFirst = await pollCount(watcher, "room", 2, 500);
    deepStrictEqual(afterFirst.counts, { connections: 2, users: 2 });
    strictEqual(await watcher.invoke("IsUserOnline", "ann"), true, "ann still has a tab");
    await ann2.stop();
    const afterSecond = await pollCount(watcher, "room", 1, 500);
    deepStrictEqual(afterSecond.counts, { connections: 1, users: 1 });
    strictEqual(await watcher.invoke("IsUserOnline", "ann"), false);
    await bob.invoke("LeaveGroup", "room");
    deepStrictEqual(await watcher.invoke("GroupCount", "room"), { connections: 0, users: 0 });
  });

  test("needs the right to the group; IsUserOnline needs admin or one's own id", async () => {
    const carol = await client({ accessToken: user("carol", ["ward:*"]) });
    await rejects(carol.invoke("GroupCount", "room"), /Access to this group is not authorized\./);
    deepStrictEqual(await carol.invoke("GroupCount", "ward:1"), { connections: 0, users: 0 });
    strictEqual(await carol.invoke("IsUserOnline", "carol"), true);
    await rejects(carol.invoke("IsUserOnline", "ann"), /This method requires the admin role\./);
    await rejects(carol.invoke("WatchPresence", "room"), /Access to this group is not authorized\./);
  });

  test("an abruptly killed client process stops counting at once", async () => {
    const watcher = await client({ accessToken: admin });
    const child = spawn(process.execPath, [new URL("./presence-child.mjs", import.meta.url).pathname, server.base, user("dave")], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    await new Promise((resolve, reject) => {
      child.stdout.on("data", (d) => d.toString().includes("joined") && resolve());
      child.on("exit", (code) => reject(new Error(`child exited early with ${code}`)));
    });
    deepStrictEqual(await watcher.invoke("GroupCount", "kill-room"), { connections: 1, users: 1 });
    child.kill("SIGKILL");
    // Over long polling the server cannot tell a killed client from one between two
    // polls: it waits the disconnect timeout (2 s here) after the abandoned poll.
    const longPolling = TRANSPORT === "LongPolling";
    const { counts, took } = await pollCount(watcher, "kill-room", 0, longPolling ? 4000 : 1500);
    deepStrictEqual(counts, { connections: 0, users: 0 }, "the kernel's FIN/RST ends the connection");
    if (longPolling) ok(took >= 1500, `not before the disconnect timeout (${took} ms)`);
    strictEqual(await watcher.invoke("IsUserOnline", "dave"), false);
  });

  test("a silent connection (a pulled cable: no FIN) stops counting within the client timeout", async () => {
    const watcher = await client({ accessToken: admin });
    const { hostname, port } = new URL(server.base);
    const socket = createConnection({ host: hostname, port: Number(port) });
    socket.on("error", () => {});
    socket.write(upgradeRequest(`/hubs/chat?access_token=${user("erin")}`));
    await sleep(100);
    socket.write(clientFrame('{"protocol":"json","version":1}\u001e'));
    socket.write(clientFrame('{"type":1,"invocationId":"1","target":"JoinGroup","arguments":["silent-room"]}\u001e'));
    const joined = await pollCount(watcher, "silent-room", 1, 2000);
    strictEqual(joined.counts.connections, 1, "the raw client joined");
    // From now on it reads nothing and sends nothing, like a host that vanished.
    socket.pause();
    const { counts, took } = await pollCount(watcher, "silent-room", 0, 5000);
    deepStrictEqual(counts, { connections: 0, users: 0 });
    ok(took >= 1500 && took < 4000, `dropped after ${took} ms with --client-timeout-secs 2`);
    strictEqual(await watcher.invoke("IsUserOnline", "erin"), false);
    socket.destroy();
  });
});

describe("WatchPresence", () => {
  test("sends the counts now, then coalesced changes, then stops after UnwatchPresence", async () => {
    const watcher = await client({ accessToken: admin });
    const events = [];
    watcher.on("PresenceChanged", (e) => events.push({ ...e, at: Date.now() }));
    strictEqual(await watcher.invoke("WatchPresence", "lobby"), null);
    await until(() => events.length === 1, 2000, "the first event");
    deepStrictEqual(events[0].group, "lobby");
    deepStrictEqual([events[0].connections, events[0].users], [0, 0]);

    // A burst of five joins over both shards: coalesced into few events, the last exact.
    const members = await Promise.all(["f1", "f2", "f3", "f4", "f4"].map((sub) => client({ accessToken: user(sub) })));
    await Promise.all(members.map((m) => m.invoke("JoinGroup", "lobby")));
    await until(() => events.at(-1).connections === 5, 2000, "the final count");
    strictEqual(events.at(-1).users, 4);
    ok(events.length <= 4, `coalesced: ${events.length} events for 5 joins`);
    for (let i = 2; i < events.length; i++) {
      ok(events[i].at - events[i - 1].at >= 60, "at most one event per ~100 ms");
    }

    // A disconnect is a change too.
    const before = events.length;
    await members[0].stop();
    await until(() => events.length > before, 2000, "the event after a disconnect");
    deepStrictEqual([events.at(-1).connections, events.at(-1).users], [4, 3]);

    await watcher.invoke("UnwatchPresence", "lobby");
    const after = events.length;
    await members[1].invoke("LeaveGroup", "lobby");
    await sleep(400);
    strictEqual(events.length, after, "no events after UnwatchPresence");
  });
});

async function rest(base, method, path, body) {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: res.status === 204 || res.status === 202 ? null : await res.json() };
}

describe("durable membership", () => {
  test("a user's durable group reaches its current tabs, future tabs, and survives a restart", async () => {
    const data = tempDataDir();
    const args = ["--threads", "2", "--jwt-secret", SECRET, "--api-key", API_KEY, "--data", data];
    let node = await startServer(args);
    const tab1 = await connect(node.base, { accessToken: user("gina") });
    tab1.on("alert", (...a) => tab1.received.push(a));
    strictEqual((await rest(node.base, "PUT", "/api/hubs/chat/groups/alert:icu/users/gina")).status, 204);
    // The current connection is in the group as soon as the PUT answered.
    strictEqual((await rest(node.base, "POST", "/api/hubs/chat/groups/alert:icu/messages", { target: "alert", arguments: [1] })).status, 202);
    await until(() => tab1.received.length === 1, 3000, "the alert on the open tab");
    // A new tab joins at connect time.
    const tab2 = await connect(node.base, { accessToken: user("gina") });
    tab2.on("alert", (...a) => tab2.received.push(a));
    deepStrictEqual((await rest(node.base, "GET", "/api/hubs/chat/groups/alert:icu")).body, { connections: 2, users: 1, userIds: ["gina"] });
    const info = (await rest(node.base, "GET", "/api/hubs/chat/users/gina")).body;
    deepStrictEqual([info.online, info.connectionIds.length, info.groups], [true, 2, ["alert:icu"]]);
    await tab1.stop();
    await tab2.stop();

    // Restart on the same address and data directory.
    strictEqual(await node.stop(), 0);
    node = await startServer(args, { listen: new URL(node.base).host });
    try {
      deepStrictEqual((await rest(node.base, "GET", "/api/hubs/chat/users/gina")).body, { online: false, connectionIds: [], groups: ["alert:icu"] });
      const tab3 = await connect(node.base, { accessToken: user("gina") });
      const other = await connect(node.base, { accessToken: user("hank") });
      tab3.on("alert", (...a) => tab3.received.push(a));
      other.on("alert", (...a) => other.received.push(a));
      await rest(node.base, "POST", "/api/hubs/chat/groups/alert:icu/messages", { target: "alert", arguments: ["after restart"] });
      await until(() => tab3.received.length === 1, 3000, "the alert after the restart");
      deepStrictEqual(tab3.received[0], ["after restart"]);

      // Durable removal: current connections leave, and it is gone after restart too.
      strictEqual((await rest(node.base, "DELETE", "/api/hubs/chat/groups/alert:icu/users/gina")).status, 204);
      deepStrictEqual((await rest(node.base, "GET", "/api/hubs/chat/groups/alert:icu")).body, { connections: 0, users: 0, userIds: [] });
      await rest(node.base, "POST", "/api/hubs/chat/groups/alert:icu/messages", { target: "alert", arguments: ["nobody"] });
      deepStrictEqual(await tab3.invoke("Echo", 1), 1);
      await sleep(100);
      strictEqual(tab3.received.length, 1);
      strictEqual(other.received.length, 0, "a user without the group never got it");
      await tab3.stop();
      await other.stop();
    } finally {
      strictEqual(await node.stop(), 0);
    }
  });
});

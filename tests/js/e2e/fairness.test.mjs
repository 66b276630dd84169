// One client must not hurt the others (contract section 6, issue 22): a member that
// trickles its reads does not set the pace of its group or of unrelated sends; slow
// request bodies, bytes parked before a first poll, sessions that hold no socket,
// presence watches and forged backplane records are all bounded, each attack staged
// as it was found and the victim's experience asserted.
import { test } from "node:test";
import { ok, strictEqual, match } from "node:assert/strict";
import { createConnection } from "node:net";
import { readFileSync } from "node:fs";
import { HttpTransportType } from "@microsoft/signalr";
import { BINARY, ONCE, connect, metric, sleep, startRedis, startServer, statusOf, trickleReader, until } from "./helpers.mjs";

const API_KEY = "fair-key";

async function rest(base, method, path, body) {
  const started = Date.now();
  const res = await fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  await res.text();
  return { status: res.status, ms: Date.now() - started };
}

/** Waits until the async `predicate` holds (or fails after `ms`). */
async function waitFor(predicate, ms, what) {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

/** Resident memory of a process, in bytes. */
const rss = (pid) => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]) * 1024;

test("a member that trickles its reads is closed within --slow-consumer-secs; its group and unrelated sends keep their pace", { skip: ONCE, timeout: 90000 }, async () => {
  const server = await startServer(["--threads", "1", "--api-key", API_KEY]);
  const clients = [];
  let reader;
  try {
    const members = [];
    for (let i = 0; i < 2; i++) {
      const member = await connect(server.base);
      clients.push(member);
      await member.invoke("JoinGroup", "room");
      let count = 0;
      member.arrivals = [];
      member.on("m", () => {
        count++;
        member.arrivals.push(Date.now());
      });
      member.count = () => count;
      members.push(member);
    }
    const publisher = await connect(server.base);
    clients.push(publisher);
    const payload = "t".repeat(4096);
    let flooding = true;
    let failedSends = 0;
    const flood = (async () => {
      const inFlight = new Set();
      while (flooding) {
        const send = publisher.invoke("SendToGroup", "room", "m", [payload]).catch(() => failedSends++);
        inFlight.add(send);
        send.finally(() => inFlight.delete(send));
        if (inFlight.size >= 16) await Promise.race(inFlight);
        // Timers run between sends even when every send settles at once.
        await new Promise(setImmediate);
      }
      await Promise.all(inFlight);
    })();
    // The group's pace without the trickling member, then with it.
    const pace = async (ms) => {
      const before = members.map((m) => m.count());
      await sleep(ms);
      return Math.min(...members.map((m, i) => ((m.count() - before[i]) * 1000) / ms));
    };
    const alone = await pace(2000);
    reader = trickleReader(server.base, "room");
    await until(() => reader.joined(), 5000, "the trickling member in the group");
    // Meanwhile REST senders post to its group, and a backend sends elsewhere.
    const restSenders = Array.from({ length: 40 }, () =>
      rest(server.base, "POST", "/api/hubs/chat/groups/room/messages", { target: "m", arguments: [payload] }).catch(() => ({ status: 0 })),
    );
    const unrelated = await rest(server.base, "POST", "/api/hubs/chat/groups/elsewhere/messages", { target: "m", arguments: ["x"] });
    strictEqual(unrelated.status, 202);
    ok(unrelated.ms < 2000, `a send to an unrelated group took ${unrelated.ms} ms`);
    const withTrickle = await pace(4000);
    await until(() => reader.closedAfter() !== null, 15000, "the trickling member closed");
    const closedAfter = reader.closedAfter();
    await sleep(1000);
    // What the others lived through: the longest wait for their next message while it
    // was there. It may hold them up for about --slow-consumer-secs (2), no longer.
    const trickleFrom = Date.now() - closedAfter - 1000;
    const longestGap = Math.max(...members.map((m) => {
      const times = m.arrivals.filter((t) => t >= trickleFrom);
      return Math.max(...times.slice(1).map((t, i) => t - times[i]));
    }));
    ok(longestGap < 2000 + 1500, `the others waited at most ${longestGap} ms for a message`);
    strictEqual(await metric(server.base, "ringhub_slow_consumer_closes_total"), 1, "only the trickling member was closed");
    strictEqual(failedSends, 0, "the publisher's sends all completed");
    for (const { status } of await Promise.all(restSenders)) strictEqual(status, 202, "every REST send to its group answered");
    console.log(`trickle: closed after ${closedAfter} ms of trickling; the others' longest wait ${longestGap} ms; group pace ${Math.round(withTrickle)}/s over 4 s with it (${Math.round(alone)}/s without); unrelated REST send ${unrelated.ms} ms`);
    flooding = false;
    await flood;
  } finally {
    reader?.stop();
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await server.stop();
  }
});

test("a REST send waits at most --rest-timeout-secs for room, then answers 503 with the reason", { skip: ONCE, timeout: 60000 }, async () => {
  // Small queues: the REST window (16 queue bounds, 1 MiB) fills with what five
  // stalled members of five groups hold (4 queue bounds each at most).
  const server = await startServer(["--threads", "1", "--api-key", API_KEY, "--max-buffered-bytes", "65536", "--rest-timeout-secs", "1", "--slow-consumer-secs", "30"]);
  const members = [];
  try {
    for (let i = 0; i < 5; i++) members.push(trickleReader(server.base, `g${i}`, 0));
    await until(() => members.every((m) => m.joined()), 5000, "the stalled members in their groups");
    const payload = "r".repeat(20000);
    const sends = [];
    for (let round = 0; round < 25; round++) {
      for (let i = 0; i < 5; i++) {
        sends.push(rest(server.base, "POST", `/api/hubs/chat/groups/g${i}/messages`, { target: "m", arguments: [payload] }));
      }
    }
    const answers = await Promise.all(sends);
    const refused = answers.filter((a) => a.status === 503);
    ok(refused.length > 0, `some sends found no room: ${answers.map((a) => a.status).join(",")}`);
    ok(answers.every((a) => a.status === 202 || a.status === 503), "each is queued or refused");
    const slowest = Math.max(...refused.map((a) => a.ms));
    ok(slowest < 1000 + 1500, `a refused send answered after ${slowest} ms (--rest-timeout-secs 1)`);
    const res = await fetch(`${server.base}/api/hubs/chat/groups/g0/messages`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: JSON.stringify({ target: "m", arguments: [payload] }),
    });
    if (res.status === 503) match((await res.json()).error, /could not be queued in time/);
  } finally {
    for (const m of members) m.stop();
    await server.stop();
  }
});

test("slow request bodies lock nobody out: unauthorized ones are refused before they are read, the others have a deadline", { skip: ONCE, timeout: 60000 }, async () => {
  // 64 descriptors: at most 32 connections in the HTTP phase.
  const server = await startServer(["--threads", "1", "--api-key", API_KEY], { binary: "prlimit", command: ["--nofile=64:64", BINARY, "serve"] });
  const { hostname, port } = new URL(server.base);
  const sockets = [];
  try {
    const answers = [];
    for (let i = 0; i < 40; i++) {
      const socket = createConnection({ host: hostname, port: Number(port) });
      socket.on("error", () => {});
      let got = "";
      socket.on("data", (d) => (got += d.toString("latin1")));
      answers.push(() => got);
      await new Promise((resolve) => socket.on("connect", resolve));
      socket.write(`POST /api/hubs/chat/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{`);
      sockets.push(socket);
    }
    await until(() => answers.every((a) => a().length > 0), 3000, "every unauthorized body refused");
    ok(answers.every((a) => statusOf(Buffer.from(a())) === 401), answers.map((a) => statusOf(Buffer.from(a()))).join(","));
    strictEqual((await fetch(`${server.base}/healthz`)).status, 200, "served meanwhile");
    // An authorized body sent a byte at a time gets 408 after its deadline (10 s for
    // the head and a small body).
    const slow = createConnection({ host: hostname, port: Number(port) });
    sockets.push(slow);
    slow.on("error", () => {});
    let slowAnswer = "";
    slow.on("data", (d) => (slowAnswer += d.toString("latin1")));
    await new Promise((resolve) => slow.on("connect", resolve));
    const started = Date.now();
    slow.write(`POST /api/hubs/chat/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\nContent-Length: 1000\r\n\r\n{`);
    const trickle = setInterval(() => slow.write(" "), 1000);
    await until(() => slowAnswer.length > 0, 15000, "the slow body's answer");
    clearInterval(trickle);
    strictEqual(statusOf(Buffer.from(slowAnswer)), 408);
    ok(Date.now() - started < 12000, `answered after ${Date.now() - started} ms`);
  } finally {
    for (const s of sockets) s.destroy();
    await server.stop();
  }
});

test("bytes posted before a first poll are capped per connection and node-wide", { skip: ONCE, timeout: 60000 }, async () => {
  const server = await startServer(["--threads", "1"]);
  try {
    const before = rss(server.child.pid);
    const megabyte = "x".repeat(1 << 20);
    const statuses = [];
    for (let i = 0; i < 150; i++) {
      const negotiated = await (await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST" })).json();
      const res = await fetch(`${server.base}/hubs/chat?id=${negotiated.connectionToken}`, { method: "POST", body: megabyte });
      await res.text();
      statuses.push(res.status);
    }
    ok(statuses.every((s) => s === 413), `answers: ${[...new Set(statuses)]}`);
    const grown = rss(server.child.pid) - before;
    ok(grown < 64 << 20, `resident memory grew by ${grown >> 20} MiB for 150 MiB posted`);
    // A handshake sent first is still kept for the transport.
    const negotiated = await (await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST" })).json();
    const kept = await fetch(`${server.base}/hubs/chat?id=${negotiated.connectionToken}`, { method: "POST", body: '{"protocol":"json","version":1}\u001e' });
    strictEqual(kept.status, 200);
  } finally {
    await server.stop();
  }
});

test("--max-connections bounds sessions of every transport: long-polling sessions count, pending polls do not lock out other requests", { skip: ONCE, timeout: 60000 }, async () => {
  // 64 descriptors: 32 HTTP-phase connections; 10 sessions.
  const server = await startServer(["--threads", "1", "--max-connections", "10"], { binary: "prlimit", command: ["--nofile=64:64", BINARY, "serve"] });
  const clients = [];
  try {
    for (let i = 0; i < 10; i++) clients.push(await connect(server.base, { transport: HttpTransportType.LongPolling }));
    let refused;
    try {
      clients.push(await connect(server.base, { transport: HttpTransportType.LongPolling }));
    } catch (e) {
      refused = e;
    }
    ok(refused, "the 11th session is refused");
    match(String(refused?.message), /503|limit/i);
    strictEqual((await fetch(`${server.base}/healthz`)).status, 200, "other requests are served");
    await clients.shift().stop();
    let again;
    await waitFor(async () => {
      again = await connect(server.base, { transport: HttpTransportType.WebSockets }).catch(() => null);
      return again !== null;
    }, 5000, "the freed place taken by a WebSocket client");
    clients.push(again);
    strictEqual(await again.invoke("Echo", 1), 1, "a place freed is taken by any transport");
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await server.stop();
  }
});

test("presence watches count toward --max-groups-per-connection", { skip: ONCE }, async () => {
  const server = await startServer(["--max-groups-per-connection", "3"]);
  const client = await connect(server.base);
  try {
    await client.invoke("JoinGroup", "a");
    await client.invoke("WatchPresence", "b");
    await client.invoke("WatchPresence", "c");
    let refused;
    try {
      await client.invoke("WatchPresence", "d");
    } catch (e) {
      refused = e;
    }
    match(String(refused?.message), /Too many groups for this connection \(limit 3\)\./);
    let joinRefused;
    try {
      await client.invoke("JoinGroup", "e");
    } catch (e) {
      joinRefused = e;
    }
    match(String(joinRefused?.message), /limit 3/);
    await client.invoke("UnwatchPresence", "c");
    await client.invoke("WatchPresence", "d");
  } finally {
    await client.stop();
    await server.stop();
  }
});

/** A backplane send as another node publishes it (the engine's `Wire::Send`). */
function wireSend(group, json, messagepack) {
  const str = (s) => {
    const b = Buffer.from(s);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length);
    return Buffer.concat([len, b]);
  };
  return Buffer.concat([Buffer.from([1]), str("forger/x"), str("chat"), Buffer.from([4]), str(group), str(json), str(messagepack)]);
}

/** PUBLISH on a raw Redis connection. */
async function redisPublish(port, channel, payload) {
  const socket = createConnection({ host: "127.0.0.1", port });
  await new Promise((resolve) => socket.on("connect", resolve));
  const bulk = (b) => Buffer.concat([Buffer.from(`$${b.length}\r\n`), b, Buffer.from("\r\n")]);
  socket.write(Buffer.concat([Buffer.from("*3\r\n"), bulk(Buffer.from("PUBLISH")), bulk(Buffer.from(channel)), bulk(payload)]));
  await new Promise((resolve) => socket.once("data", resolve));
  socket.destroy();
}

test("records from the backplane are checked like client input: forged ones are counted and dropped", { skip: ONCE, timeout: 30000 }, async () => {
  const redis = await startRedis();
  const server = await startServer(["--redis", redis.url]);
  const client = await connect(server.base);
  try {
    await waitFor(async () => (await metric(server.base, "ringhub_backplane_connected")) === 1, 5000, "connected to Redis");
    await client.invoke("JoinGroup", "g");
    let closed = false;
    client.onclose(() => (closed = true));
    const channel = "ringhub:group:chat:g";
    const forged = [
      wireSend("g", '{"type":7,"error":"forged"}\u001e', "\u0002\u0091\u0007"),
      wireSend("g", "not json at all\u001e", ""),
      wireSend("g", Buffer.from([0x7b, 0xff, 0xfe, 0x1e]), ""),
      wireSend("g", "", ""),
      wireSend("g", `{"type":1,"target":"receive","arguments":["${"x".repeat(600_000)}"]}\u001e`, ""),
    ];
    for (const payload of forged) await redisPublish(redis.port, channel, payload);
    await redisPublish(redis.port, channel, Buffer.from("garbage that is no backplane message"));
    await waitFor(async () => (await metric(server.base, "ringhub_backplane_rejected_total")) >= forged.length + 1, 3000, "every forged record counted");
    await sleep(300);
    ok(!closed, "the member is still connected");
    strictEqual(client.received.length, 0, "nothing forged reached it");
    strictEqual(await client.invoke("Echo", 2), 2);
  } finally {
    await client.stop();
    await server.stop();
    await redis.stop();
  }
});

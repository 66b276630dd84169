// A node crashes (SIGKILL) while traffic flows and a process manager starts it again
// with the same flags: with the default --node-name that is a new name. The
// replacement must be a full member of the cluster within --client-timeout-secs + 2 s of
// listening (contract section 7): every send kind reaches its connections from the
// other node and back, presence counts both nodes (the crashed process's connections no
// longer), and nothing arrives twice.
import { test } from "node:test";
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";
import { sleep, until } from "../e2e/helpers.mjs";
import { appClient, clusterOfTwo, eventually, rest, steadySender } from "./faults.mjs";

const CLIENT_TIMEOUT_MS = 30_000; // the default --client-timeout-secs

const cluster = clusterOfTwo();
const { clients } = cluster;

const joinRoom = (group) => async (c) => {
  await c.invoke("JoinGroup", group);
};

test("a crashed node started again under a new name is a full member of the cluster", async () => {
  // Members of one room on both nodes; a publisher on each node keeps traffic flowing.
  const onA = await appClient(cluster.a.base, "ann", { setup: joinRoom("room") });
  const onB = await appClient(cluster.b.base, "bob", { setup: joinRoom("room") });
  const bobsOther = await appClient(cluster.b.base, "bob", { msgpack: true, setup: joinRoom("room") });
  clients.push(onA, onB, bobsOther);
  const publisherA = steadySender(onA, "room", 20);
  await until(() => onB.received.length > 5 && bobsOther.received.length > 5, 5000, "cross-node traffic before the crash");

  const listening = await cluster.b.crashAndRestart();
  // The stock clients of the dead node reconnect (automatic reconnect) to its
  // replacement on the same address and join their room again.
  await until(() => onB.reconnects === 1 && bobsOther.reconnects === 1, 15_000, "B's clients back on the replacement");
  const publisherB = steadySender(onB, "room", 20);

  // Every send kind, from either node, reaches the replacement's members (and back),
  // each exactly once. Rounds of every kind are sent until one round arrives whole.
  const kinds = (tag) => [
    ["SendToAll", "receive", [`${tag}-all`]],
    ["SendToGroup", "room", "receive", [`${tag}-group`]],
    ["SendToGroupExcept", "room", [bobsOther.connectionId], "receive", [`${tag}-group-except`]],
    ["SendToOthersInGroup", "room", "receive", [`${tag}-others-in-group`]],
    ["SendToGroups", ["room", "elsewhere"], "receive", [`${tag}-groups`]],
    ["SendToUser", "bob", "receive", [`${tag}-user`]],
    ["SendToUsers", ["bob", "nobody"], "receive", [`${tag}-users`]],
    ["SendToConnection", onB.connectionId, "receive", [`${tag}-connection`]],
    ["SendToOthers", "receive", [`${tag}-others`]],
  ];
  const tagged = (c, tag) => c.received.filter((v) => typeof v === "string" && v.startsWith(`${tag}-`));
  // JoinGroup completes only once messages sent to the group afterwards reach the
  // member from any node (contract section 4): so the first round sent after B's
  // clients are back must arrive whole.
  const whole = { tag: "round0", sends: kinds("round0") };
  for (const [method, ...args] of whole.sends) strictEqual(await onA.invoke(method, ...args), null, method);
  const fullMember = await eventually(
    async () => tagged(onB, whole.tag).length >= whole.sends.length && tagged(bobsOther, whole.tag).length >= whole.sends.length - 2,
    3000,
    "the first round of every send kind from A after B's clients rejoined",
  );
  const sinceListening = Date.now() - listening;
  ok(sinceListening <= CLIENT_TIMEOUT_MS + 2000, `full member ${sinceListening} ms after listening`);
  deepStrictEqual(tagged(onB, whole.tag).sort(), whole.sends.map((s) => s.at(-1)[0]).sort(), "each kind once");
  const notForOther = [`${whole.tag}-group-except`, `${whole.tag}-connection`];
  deepStrictEqual(
    tagged(bobsOther, whole.tag).sort(),
    whole.sends.map((s) => s.at(-1)[0]).filter((v) => !notForOther.includes(v)).sort(),
    "the replacement's other connection: every kind but the two that exclude it",
  );
  for (const c of [onA, onB, bobsOther]) {
    const strings = c.received.filter((v) => typeof v === "string");
    strictEqual(new Set(strings).size, strings.length, "nothing delivered twice");
  }

  // And from the replacement to A.
  strictEqual(await onB.invoke("SendToConnection", onA.connectionId, "receive", [`${whole.tag}-back`]), null);
  await until(() => onA.received.includes(`${whole.tag}-back`), 3000, "a send from the replacement to A");

  // Presence on A counts the replacement's connections and no longer the dead ones.
  await eventually(async () => {
    const count = await onA.invoke("GroupCount", "room");
    return count.connections === 3 && count.users === 2;
  }, CLIENT_TIMEOUT_MS + 2000, "A's count of the room: its member and B's two");
  const user = (await rest(cluster.a.base, "GET", "/api/hubs/chat/users/bob")).body;
  deepStrictEqual(user.connectionIds.sort(), [onB.connectionId, bobsOther.connectionId].sort());
  ok(Date.now() - listening <= CLIENT_TIMEOUT_MS + 2000);

  // The steady traffic: per publisher, in order and nothing twice, on every member
  // (what B's members missed while B was down is gone with their old connections).
  await publisherA.stop();
  await publisherB.stop();
  await sleep(500);
  for (const c of [onA, onB, bobsOther]) {
    for (const label of [publisherA.label, publisherB.label]) {
      const numbers = c.received.filter((v) => typeof v === "string" && v.startsWith(`${label}:`)).map((v) => Number(v.split(":")[1]));
      ok(numbers.every((n, i) => i === 0 || n > numbers[i - 1]), `${label} in order, once each`);
    }
  }
  const local = onA.received.filter((v) => typeof v === "string" && v.startsWith(`${publisherA.label}:`));
  strictEqual(local.length, publisherA.sent, "A's own member got every message of A's publisher");
  console.log(`replacement: full member ${fullMember} ms after its clients were back, ${sinceListening} ms after listening`);
});

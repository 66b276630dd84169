// Concurrent durable changes of one user's membership through two nodes: a REST PUT
// through one and a DELETE through the other, at the same moment, 40 times. Whatever
// order the store took them in, the user's live connections (on both nodes) must end
// in the group exactly when the store says the user is a member: a revocation is never
// lost, and an addition never undone by a stale one.
import { test } from "node:test";
import { ok, strictEqual } from "node:assert/strict";
import { sleep } from "../e2e/helpers.mjs";
import { appClient, clusterOfTwo, eventually, rest } from "./faults.mjs";

const ROUNDS = 40;

const cluster = clusterOfTwo();
const { clients } = cluster;

test("store and live membership agree after concurrent PUT and DELETE through both nodes", async () => {
  const onA = await appClient(cluster.a.base, "rita");
  const onB = await appClient(cluster.b.base, "rita", { msgpack: true });
  clients.push(onA, onB);
  const path = "/api/hubs/chat/groups/contested/users/rita";
  const disagreements = [];
  for (let round = 0; round < ROUNDS; round++) {
    // Both at once, in either order of starting.
    const put = () => rest(cluster.a.base, "PUT", path);
    const del = () => rest(cluster.b.base, "DELETE", path);
    const [first, second] = round % 2 ? [put, del] : [del, put];
    const statuses = await Promise.all([first(), second()]);
    for (const { status } of statuses) strictEqual(status, 204, `round ${round}`);
    const stored = (await rest(cluster.a.base, "GET", "/api/hubs/chat/users/rita")).body.groups.includes("contested");
    // The live membership: does a send to the group reach each connection?
    const probe = `probe-${round}`;
    strictEqual((await rest(cluster.b.base, "POST", "/api/hubs/chat/groups/contested/messages", { target: "receive", arguments: [probe] })).status, 202);
    // A member gets it within moments; a non-member must not get it at all.
    if (stored) {
      await eventually(async () => onA.received.includes(probe) && onB.received.includes(probe), 2000, `round ${round}: members receive`).catch(() => {});
    } else {
      await sleep(300);
    }
    const live = [onA.received.includes(probe), onB.received.includes(probe)];
    if (live.some((member) => member !== stored)) disagreements.push({ round, stored, live });
  }
  ok(disagreements.length === 0, `store and live membership disagreed in ${disagreements.length} of ${ROUNDS} rounds: ${JSON.stringify(disagreements)}`);
});

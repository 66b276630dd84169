// Tokens and group authorization (contract section 3 and 10), with the stock client.
import { after, before, test } from "node:test";
import { rejects, strictEqual, deepStrictEqual } from "node:assert/strict";
import { connect, sleep, startServer, token, until } from "./helpers.mjs";

let server;
const open = [];
async function as(claims, options = {}) {
  const c = await connect(server.base, { accessToken: token(claims), ...options });
  open.push(c);
  return c;
}

before(async () => {
  server = await startServer(["--jwt-secret", "test-secret", "--threads", "2"]);
});
after(async () => {
  await Promise.all(open.map((c) => c.stop().catch(() => {})));
  await server.stop();
});

test("tokens: valid ones connect, the rest are refused with 401", async () => {
  const ok = await as({ sub: "ann" });
  strictEqual(await ok.invoke("Echo", 1), 1);
  const refused = async (accessToken) => rejects(connect(server.base, accessToken === undefined ? {} : { accessToken }), /401|Unauthorized/);
  await refused(undefined);
  await refused(token({ sub: "ann" }, { secret: "wrong-secret" }));
  await refused(token({ sub: "ann" }, { expiresIn: -60 }));
  // Not valid yet: nbf an hour ahead (past the 30 s leeway); 10 s ahead is skew.
  const now = Math.floor(Date.now() / 1000);
  await refused(token({ sub: "ann", nbf: now + 3600 }));
  const skewed = await as({ sub: "ann", nbf: now + 10 });
  strictEqual(await skewed.invoke("Echo", 2), 2);
  await refused(token({ sub: "ann" }, { alg: "none" }));
  await refused("not-a-jwt");
  // The upgrade checks the token too (skipNegotiation goes straight to it).
  await rejects(connect(server.base, { skipNegotiation: true, accessToken: token({ sub: "x" }, { secret: "nope" }) }));
  const res = await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST" });
  strictEqual(res.status, 401);
});

test("group patterns and the admin role decide joins and sends", async () => {
  const ann = await as({ sub: "ann", groups: ["ward:*", "lobby"] });
  const bob = await as({ sub: "bob", groups: ["lobby"] });
  const admin = await as({ sub: "root", role: "admin" });
  strictEqual(await ann.invoke("JoinGroup", "ward:4b"), null);
  strictEqual(await ann.invoke("JoinGroup", "ward:"), null, "a prefix matches an empty rest");
  await rejects(ann.invoke("JoinGroup", "alert:fire"), { message: "Access to this group is not authorized." });
  await rejects(ann.invoke("JoinGroup", "Ward:4b"), { message: "Access to this group is not authorized." }, "case-sensitive");
  await rejects(bob.invoke("SendToGroup", "ward:4b", "receive", ["x"]), { message: "Access to this group is not authorized." });
  await rejects(bob.invoke("SendToGroups", ["lobby", "ward:4b"], "receive", ["x"]), { message: "Access to this group is not authorized." });
  for (const method of ["SendToAll", "SendToOthers"]) {
    await rejects(bob.invoke(method, "receive", ["x"]), { message: "This method requires the admin role." });
  }
  await rejects(bob.invoke("SendToUser", "ann", "receive", ["x"]), { message: "This method requires the admin role." });
  await rejects(bob.invoke("SendToUsers", ["ann"], "receive", ["x"]), { message: "This method requires the admin role." });
  // A connection id is no secret (an app may show or broadcast it): a direct send to one
  // is an admin's, like a send to a user.
  await rejects(bob.invoke("SendToConnection", ann.connectionId, "receive", ["x"]), { message: "This method requires the admin role." });
  strictEqual(await admin.invoke("SendToConnection", ann.connectionId, "receive", ["from the admin"]), null);
  await until(() => ann.received.length === 1);
  deepStrictEqual(ann.received.shift(), ["from the admin"]);
  strictEqual(await admin.invoke("JoinGroup", "alert:fire"), null, "admin may join every group");
  strictEqual(await ann.invoke("SendToGroup", "ward:4b", "receive", ["ward news"]), null);
  await until(() => ann.received.length === 1);
  deepStrictEqual(ann.received[0], ["ward news"]);
});

test("user targeting reaches every connection of the user, and only those", async () => {
  const tab1 = await as({ sub: "carol" });
  const tab2 = await as({ sub: "carol" }, { msgpack: true });
  const dave = await as({ sub: "dave" });
  const eve = await as({ sub: "eve" });
  const admin = await as({ sub: "root", role: "admin" });
  await admin.invoke("SendToUser", "carol", "receive", ["for carol"]);
  await until(() => tab1.received.length === 1 && tab2.received.length === 1);
  await admin.invoke("SendToUsers", ["carol", "dave"], "receive", ["for both"]);
  await until(() => dave.received.length === 1 && tab1.received.length === 2 && tab2.received.length === 2);
  await sleep(100);
  strictEqual(eve.received.length, 0);
  deepStrictEqual(tab2.received, [["for carol"], ["for both"]]);
});

// The ward monitor embedding example (engine/examples/ward_monitor.rs) driven by the
// stock client: access checks, snapshots, admissions pushed by the backend task through
// HubContext, alerts, and viewers told when another viewer disconnects.
import { after, before, test } from "node:test";
import { deepStrictEqual, rejects, strictEqual } from "node:assert/strict";
import { connect, startServer, sleep, token, until, WARD_MONITOR } from "./helpers.mjs";

const SECRET = "ward-secret";
let server;
const open = [];

/** A dashboard: a connection to the `wards` hub that records every event by name. */
async function dashboard(sub, groups) {
  const c = await connect(server.base, { hub: "wards", accessToken: token({ sub, groups }, { secret: SECRET }) });
  c.events = {};
  for (const name of ["WardStateSnapshot", "PatientAdmitted", "AdmissionConfirmed", "Alert", "ViewerDisconnected"]) {
    c.events[name] = [];
    c.on(name, (e) => c.events[name].push(e));
  }
  open.push(c);
  return c;
}

before(async () => {
  server = await startServer(["--threads", "2", "--jwt-secret", SECRET], { binary: WARD_MONITOR, command: [] });
});
after(async () => {
  await Promise.all(open.map((c) => c.stop().catch(() => {})));
  strictEqual(await server.stop(), 0);
});

test("a nurse subscribes, admits a patient, and every party hears of it", async () => {
  const nurseTab1 = await dashboard("nurse-ann", ["ward:7", "alert:*"]);
  const nurseTab2 = await dashboard("nurse-ann", ["ward:7", "alert:*"]);
  const doctor = await dashboard("dr-bob", ["ward:*", "alert:admission"]);
  const outsider = await dashboard("clerk-cy", ["ward:9"]);

  await rejects(outsider.invoke("SubscribeToWard", "7"), /You are not authorized to view ward 7\./);
  await rejects(outsider.invoke("SubscribeToAlerts", ["admission"]), /not authorized to receive alert:admission alerts/);
  await rejects(outsider.invoke("AdmitPatient", "7", "Mallory"), /not authorized to view ward 7/);

  strictEqual(await nurseTab1.invoke("SubscribeToWard", "7"), null);
  await until(() => nurseTab1.events.WardStateSnapshot.length === 1, 3000, "the snapshot");
  deepStrictEqual(nurseTab1.events.WardStateSnapshot[0], { wardId: "7", patients: [], viewers: 1 });
  await doctor.invoke("SubscribeToWard", "7");
  await until(() => doctor.events.WardStateSnapshot.length === 1, 3000, "the doctor's snapshot");
  strictEqual(doctor.events.WardStateSnapshot[0].viewers, 2);
  deepStrictEqual(await doctor.invoke("SubscribeToAlerts", ["admission"]), ["alert:admission"]);

  strictEqual(await nurseTab1.invoke("AdmitPatient", "7", "Jane Roe"), null);
  // Pushed by the example's backend thread, so not ordered with the Completion: every
  // party is waited for (a long-polling tab hears of it at its next poll).
  await until(
    () => [doctor, nurseTab1].every((c) => c.events.PatientAdmitted.length === 1)
      && [nurseTab1, nurseTab2].every((c) => c.events.AdmissionConfirmed.length === 1),
    3000,
    "the admission",
  );
  deepStrictEqual(doctor.events.PatientAdmitted[0], { wardId: "7", patient: "Jane Roe", admittedBy: "nurse-ann" });
  deepStrictEqual(nurseTab1.events.PatientAdmitted[0], doctor.events.PatientAdmitted[0]);
  // Confirmed to every tab of the admitting user (tab 2 never subscribed to the ward).
  deepStrictEqual(nurseTab1.events.AdmissionConfirmed, [{ wardId: "7", patient: "Jane Roe" }]);
  deepStrictEqual(nurseTab2.events.AdmissionConfirmed, [{ wardId: "7", patient: "Jane Roe" }]);
  strictEqual(nurseTab2.events.PatientAdmitted.length, 0);
  await until(() => doctor.events.Alert.length === 1, 3000, "the alert");
  deepStrictEqual(doctor.events.Alert[0], { type: "admission", wardId: "7", patient: "Jane Roe" });

  // A later viewer's snapshot includes the admission.
  const lateNurse = await dashboard("nurse-dee", ["ward:7"]);
  await lateNurse.invoke("SubscribeToWard", "7");
  await until(() => lateNurse.events.WardStateSnapshot.length === 1, 3000, "the late snapshot");
  deepStrictEqual(lateNurse.events.WardStateSnapshot[0].patients, ["Jane Roe"]);

  // The doctor leaves: the ward's remaining viewers are told, others are not.
  const doctorId = doctor.connectionId;
  await doctor.stop();
  await until(() => nurseTab1.events.ViewerDisconnected.length === 1 && lateNurse.events.ViewerDisconnected.length === 1, 3000, "ViewerDisconnected");
  deepStrictEqual(nurseTab1.events.ViewerDisconnected[0], { wardId: "7", connectionId: doctorId, userId: "dr-bob" });
  await sleep(100);
  strictEqual(outsider.events.ViewerDisconnected.length, 0);
  strictEqual(nurseTab2.events.ViewerDisconnected.length, 0);
  strictEqual(outsider.events.PatientAdmitted.length + outsider.events.Alert.length, 0, "the outsider heard nothing");
});

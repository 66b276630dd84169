// A client process for the abrupt-kill test: connects, joins "kill-room", says so, and
// waits to be killed with SIGKILL (so it never closes its connection itself).
import { connect } from "./helpers.mjs";

const [base, accessToken] = process.argv.slice(2);
const connection = await connect(base, { accessToken });
await connection.invoke("JoinGroup", "kill-room");
process.stdout.write("joined\n");
setInterval(() => {}, 1 << 30);

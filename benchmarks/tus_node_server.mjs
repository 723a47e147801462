// The Node reference server for the benchmark: @tus/server with @tus/file-store, as its
// README sets it up, on 127.0.0.1. The harness copies this file next to the node_modules it
// installs (benchmarks/.work/node/) so the imports resolve, then runs:
//   node tus_node_server.mjs PORT DIRECTORY
// It prints "listening on http://127.0.0.1:PORT/files/" once it accepts connections.
// Node's own 300 s request timeout is turned off: a 10 GiB PATCH may take longer.
import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const port = Number(process.argv[2] ?? "0");
const directory = process.argv[3] ?? "./files";

const tus = new Server({ path: "/files", datastore: new FileStore({ directory }) });
const http = tus.listen({ host: "127.0.0.1", port });
http.requestTimeout = 0;
http.on("listening", () => {
  console.log(`listening on http://127.0.0.1:${http.address().port}/files/`);
});
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}

// MicroVM Sandbox client for Node.js: the service definition is loaded from protos/ at run time
// (@grpc/proto-loader), so the client always matches the API it is shipped with.
"use strict";
const path = require("path");
const fs = require("fs");
const os = require("os");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const REPO = path.resolve(__dirname, "..", "..");
const definition = protoLoader.loadSync("microvm/sandbox/v1/sandbox_service.proto", {
  includeDirs: [path.join(REPO, "protos"), path.join(REPO, "third_party", "googleapis")],
  keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
});
const { SandboxService } = grpc.loadPackageDefinition(definition).microvm.sandbox.v1;

function apiKey() {
  if (process.env.MVM_API_KEY) return process.env.MVM_API_KEY.trim();
  const stateDir = process.env.MVM_STATE_DIR || path.join(os.homedir(), ".microvm");
  return fs.readFileSync(path.join(stateDir, "admin.key"), "utf8").trim();
}

class SandboxClient {
  constructor(address = process.env.MVM_GATEWAY || "127.0.0.1:50051", key = apiKey()) {
    this.stub = new SandboxService(address, grpc.credentials.createInsecure());
    this.metadata = new grpc.Metadata();
    this.metadata.set("authorization", `Bearer ${key}`);
  }

  deadline(seconds = 120) {
    return { deadline: new Date(Date.now() + seconds * 1000) };
  }

  call(method, request, seconds) {
    return new Promise((resolve, reject) =>
      this.stub[method](request, this.metadata, this.deadline(seconds), (error, reply) =>
        error ? reject(error) : resolve(reply)));
  }

  async create(template = "default") {
    return (await this.call("CreateSandbox", { sandbox: { template } }, 300)).sandbox;
  }

  async delete(name) {
    await this.call("DeleteSandbox", { name });
  }

  // Streams the process's events to `onEvent` as they arrive; resolves with the exit status.
  exec(name, argv, onEvent = () => {}) {
    return new Promise((resolve, reject) => {
      const stream = this.stub.Exec({ sandbox: name, process: { argv } }, this.metadata, this.deadline(600));
      let exited = null;
      stream.on("data", (event) => {
        onEvent(event);
        if (event.event === "exited") exited = event.exited;
      });
      stream.on("error", reject);
      stream.on("end", () => (exited ? resolve(exited) : reject(new Error("no exit status"))));
    });
  }
}

module.exports = { SandboxClient };

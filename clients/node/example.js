// Create a sandbox, stream a command's output live, delete the sandbox.
"use strict";
const { SandboxClient } = require("./index");

async function main() {
  const client = new SandboxClient();
  const sandbox = await client.create();
  console.log(`created ${sandbox.name}`);
  try {
    const exited = await client.exec(sandbox.name, ["sh", "-c", "for i in 1 2 3; do echo line $i; done; uname -s"],
      (event) => {
        if (event.stdout) process.stdout.write(Buffer.from(event.stdout));
        if (event.stderr) process.stderr.write(Buffer.from(event.stderr));
      });
    console.log(`exit code ${exited.exit_code ?? 0}`);
  } finally {
    await client.delete(sandbox.name);
    console.log(`deleted ${sandbox.name}`);
  }
}

main().catch((error) => { console.error(`error: ${error.code} ${error.details || error.message}`); process.exit(1); });

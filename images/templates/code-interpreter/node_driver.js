// The Node.js side of a `javascript` context of the code server (node_context.py starts one per context):
//
//     node --expose-internals node_driver.js REQUESTS_FD
//
// Reads runs from REQUESTS_FD, one JSON object a line: {"code": str, "marker": str, "env": {str: str}}, one at a
// time. Runs the code as a script in this process's own global context (vm.runInThisContext, as Node's REPL does),
// so state persists between runs: `var` and function declarations and globals as in the REPL, and top-level
// `let`, `const` and `class` too (a later run cannot declare the same name again with them: SyntaxError, as in the
// REPL). Code with a top-level `await` is rewritten the way the REPL does it (its internal processTopLevelAwait, hence
// --expose-internals); its declarations then become `let`/`var` in the global scope (so a `const` there can be
// reassigned later). Without that module such code runs inside an async function: its declarations stay there.
// `require` resolves from the working directory.
//
// What the code prints goes to this process's stdout and stderr; at the end of the run the driver writes
// "MARKER <json>\n" on stdout ({"status": "ok" | "error", "events": [result or error event]}) and "MARKER\n" on
// stderr. The value of the last expression, unless undefined, is a result with text/plain (util.inspect) and, for
// plain JSON-able objects and arrays, application/json. A SIGINT ends synchronous code (vm's breakOnSigint) and stops
// waiting for an awaited promise (which may go on in the background): error "Interrupted".
'use strict';

const net = require('net');
const path = require('path');
const readline = require('readline');
const util = require('util');
const vm = require('vm');
const { createRequire } = require('module');

let processTopLevelAwait = null;
try {
  ({ processTopLevelAwait } = require('internal/repl/await'));
} catch {
  // no --expose-internals, or a Node without it: top-level await runs inside an async function
}

// Captured before any user code runs: user code shares this global context and may replace them.
const { parse, stringify } = JSON;
const { inspect } = util;
const writeOut = process.stdout.write.bind(process.stdout);
const writeErr = process.stderr.write.bind(process.stderr);
const { getPrototypeOf, keys } = Object;
const ObjectPrototype = Object.prototype;
const isArray = Array.isArray;
const MAX_JSON_CHARS = 1024 * 1024;
const MAX_JSON_DEPTH = 100;
const INSPECT_OPTIONS = { depth: 6, maxArrayLength: 1000, maxStringLength: 100000, breakLength: 100 };

globalThis.require = createRequire(path.join(process.cwd(), '<cell>'));

let interruptWaiting = null; // while a run awaits a promise: ends that wait
process.on('SIGINT', () => {
  if (interruptWaiting !== null) interruptWaiting();
});
process.on('uncaughtException', (error) => writeErr(`Uncaught ${inspectSafely(error)}\n`));
process.on('unhandledRejection', (reason) => writeErr(`Unhandled rejection: ${inspectSafely(reason)}\n`));

function inspectSafely(value) {
  try {
    return inspect(value, INSPECT_OPTIONS);
  } catch (error) {
    return `<uninspectable: ${String(error)}>`;
  }
}

class Interrupted extends Error {}

function isPlain(value, depth) {
  if (value === null || typeof value === 'string' || typeof value === 'boolean') return true;
  if (typeof value === 'number') return Number.isFinite(value);
  if (typeof value !== 'object' || depth > MAX_JSON_DEPTH) return false;
  if (isArray(value)) return value.every((item) => isPlain(item, depth + 1));
  const prototype = getPrototypeOf(value);
  if (prototype !== ObjectPrototype && prototype !== null) return false;
  return keys(value).every((key) => isPlain(value[key], depth + 1));
}

function resultEvent(value) {
  const data = { 'text/plain': inspectSafely(value) };
  if (value !== null && typeof value === 'object') {
    try {
      const text = isPlain(value, 0) ? stringify(value) : undefined;
      if (text !== undefined && text.length <= MAX_JSON_CHARS) data['application/json'] = parse(text);
    } catch {
      // a getter that throws, a cycle: no json form
    }
  }
  return { type: 'result', is_main_result: true, data };
}

function errorEvent(error) {
  if (error instanceof Interrupted || (error && error.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED')) {
    const value = 'the code was interrupted (SIGINT); the context keeps its state';
    return { type: 'error', name: 'Interrupted', value, traceback: [] };
  }
  if (error === null || typeof error !== 'object') {
    return { type: 'error', name: 'Error', value: `Uncaught ${inspectSafely(error)}`, traceback: [] };
  }
  let name, value, stack;
  try {
    name = String(error.name ?? error.constructor?.name ?? 'Error');
    value = String(error.message ?? '');
    stack = typeof error.stack === 'string' ? error.stack.split('\n') : [];
  } catch {
    return { type: 'error', name: 'Error', value: inspectSafely(error), traceback: [] };
  }
  const ours = (line) => /^\s+at /.test(line) && /node_driver\.js|\(node:|at node:/.test(line);
  return { type: 'error', name, value, traceback: stack.filter((line) => !ours(line)) };
}

function untilInterrupted(promise) {
  return new Promise((resolve, reject) => {
    interruptWaiting = () => reject(new Interrupted());
    Promise.resolve(promise).then(resolve, reject);
  }).finally(() => {
    interruptWaiting = null;
  });
}

async function evaluate(code, filename) {
  let source = code;
  let unwrap = null; // how to get the value out of the awaited promise of a rewritten cell
  if (/\bawait\b/.test(code)) {
    const rewritten = processTopLevelAwait ? rewrite(code) : null;
    if (rewritten !== null) {
      [source, unwrap] = [rewritten, (box) => box?.value];
    } else if (!processTopLevelAwait && !compiles(code, filename)) {
      [source, unwrap] = [`(async () => {\n${code}\n})()`, () => undefined];
    }
  }
  const value = new vm.Script(source, { filename }).runInThisContext({ breakOnSigint: true, displayErrors: false });
  return unwrap === null ? value : unwrap(await untilInterrupted(value));
}

function rewrite(code) {
  try {
    return processTopLevelAwait(code);
  } catch {
    return null; // not parseable: compiling the code as it is reports the error
  }
}

function compiles(code, filename) {
  try {
    new vm.Script(code, { filename });
    return true;
  } catch {
    return false;
  }
}

function setEnv(env) {
  const saved = {};
  for (const [name, value] of Object.entries(env || {})) {
    saved[name] = Object.prototype.hasOwnProperty.call(process.env, name) ? process.env[name] : undefined;
    process.env[name] = value;
  }
  return saved;
}

function restoreEnv(saved) {
  for (const [name, value] of Object.entries(saved)) {
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  }
}

let runs = 0;

async function run({ code, marker, env }) {
  runs += 1;
  const events = [];
  let status = 'ok';
  const saved = setEnv(env);
  try {
    const value = await evaluate(String(code), `<cell ${runs}>`);
    if (value !== undefined) events.push(resultEvent(value));
  } catch (error) {
    status = 'error';
    events.push(errorEvent(error));
  } finally {
    restoreEnv(saved);
  }
  let trailer;
  try {
    trailer = stringify({ status, events });
  } catch (error) {
    trailer = stringify({ status: 'error', events: [errorEvent(error)] });
  }
  writeOut(`${marker} ${trailer}\n`);
  writeErr(`${marker}\n`);
}

async function main() {
  // a pipe handle, not fs.createReadStream: a read blocked in the thread pool would keep process.exit() from exiting
  const input = new net.Socket({ fd: Number(process.argv[2]), readable: true, writable: false });
  const requests = readline.createInterface({ input });
  for await (const line of requests) {
    if (line.trim()) await run(parse(line));
  }
  process.exit(0);
}

main();

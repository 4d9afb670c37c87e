// Runs one script under the MicroPython WebAssembly port on Node.js.
// The firmware library tree is copied into the port's in-memory filesystem at
// /lib; an optional host folder is mirrored as the board's flash at /flash and
// written back after the run, so flash contents survive between runs.
import fs from "node:fs";
import path from "node:path";
import { randomFillSync } from "node:crypto";

function usage(msg) {
  process.stderr.write(`mp_runner: ${msg}\n`);
  process.exit(2);
}

const args = process.argv.slice(2);
const opts = { libs: [], fsDir: null, heap: 4 * 1024 * 1024, pystack: 4096, runtime: null, script: null, argv: [] };
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (opts.script !== null) { opts.argv.push(a); continue; }
  if (a === "--lib") opts.libs.push(args[++i]);
  else if (a === "--fs") opts.fsDir = args[++i];
  else if (a === "--heap") opts.heap = parseInt(args[++i], 10);
  else if (a === "--pystack") opts.pystack = parseInt(args[++i], 10);
  else if (a === "--runtime") opts.runtime = args[++i];
  else if (a.startsWith("--")) usage(`unknown option ${a}`);
  else opts.script = a;
}
if (!opts.script) usage("no script given");
if (!opts.runtime) usage("--runtime PATH/micropython.mjs is required");

const { loadMicroPython } = await import(path.resolve(opts.runtime));
const mp = await loadMicroPython({
  heapsize: opts.heap,
  pystack: opts.pystack,
  linebuffer: false,
  stdout: (bytes) => process.stdout.write(bytes),
  stderr: (bytes) => process.stderr.write(bytes),
});
const FS = mp.FS;

function copyIn(hostDir, mpDir) {
  try { FS.mkdir(mpDir); } catch (e) { /* exists */ }
  for (const ent of fs.readdirSync(hostDir, { withFileTypes: true })) {
    const h = path.join(hostDir, ent.name);
    const m = `${mpDir}/${ent.name}`;
    if (ent.isDirectory()) {
      if (ent.name === "node_modules" || ent.name === "__pycache__") continue;
      copyIn(h, m);
    } else if (ent.isFile()) {
      FS.writeFile(m, fs.readFileSync(h));
    }
  }
}

function copyOut(mpDir, hostDir) {
  fs.mkdirSync(hostDir, { recursive: true });
  const seen = new Set();
  for (const name of FS.readdir(mpDir)) {
    if (name === "." || name === "..") continue;
    seen.add(name);
    const m = `${mpDir}/${name}`;
    const h = path.join(hostDir, name);
    if (FS.isDir(FS.stat(m).mode)) copyOut(m, h);
    else fs.writeFileSync(h, FS.readFile(m));
  }
  for (const ent of fs.readdirSync(hostDir, { withFileTypes: true })) {
    if (!seen.has(ent.name)) fs.rmSync(path.join(hostDir, ent.name), { recursive: true, force: true });
  }
}

for (const lib of opts.libs) copyIn(lib, "/lib");
if (opts.fsDir) {
  fs.mkdirSync(opts.fsDir, { recursive: true });
  copyIn(opts.fsDir, "/flash");
  FS.chdir("/flash");
}

// The port has no os.urandom; the host offers entropy through a JS module,
// which firmware code reaches only through its HAL.
mp.registerJsModule("_host", {
  urandom_hex: (n) => { const b = Buffer.alloc(n); randomFillSync(b); return b.toString("hex"); },
});

const scriptText = fs.readFileSync(opts.script, "utf8");
const argvList = JSON.stringify([opts.script, ...opts.argv]);
let status = 0;
try {
  mp.runPython(`import sys\nsys.argv[:] = ${argvList}\nif '/lib' not in sys.path: sys.path.append('/lib')\n`);
  mp.runPython(scriptText);
} catch (error) {
  if (error.name !== "PythonError") throw error;
  if (error.type === "SystemExit") {
    const m = /SystemExit:\s*(-?\d+)/.exec(error.message);
    status = m ? parseInt(m[1], 10) : 0;
    if (!m && /SystemExit:\s*\S/.test(error.message)) { process.stderr.write(error.message); status = 1; }
  } else {
    process.stderr.write(error.message);
    status = 1;
  }
}
if (opts.fsDir) copyOut("/flash", opts.fsDir);
process.exitCode = status;

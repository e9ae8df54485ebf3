// The Yjs side of Lattica's interop tests: a real Yjs client (npm `yjs`, pinned in
// package-lock.json) that reads and makes document updates. One JSON request on stdin, one JSON
// answer on stdout; binary updates travel base64-encoded.
//
//   {"op": "decode", "roots": {"m": "map"}, "updates": [B64, ...]}
//       -> {"json": {"m": {...}}}            apply the updates in order, print the document
//   {"op": "encode", "roots": {...}, "base": [B64, ...], "edits": [EDIT, ...], "client_id": N}
//       -> {"update": B64, "json": {...}}   apply base, make the edits in one transaction, print
//                                            only what the edits added (a delta against base);
//                                            client_id (optional) is the Yjs client writing
//
// roots name the document's top-level types and their kinds ("map", "array", "text"): a Yjs
// document does not record the kind of a root, the reader has to know it.
// EDIT is {"root": NAME, "set": {KEY: VALUE}} or {"root": NAME, "delete": [KEY]} (maps),
// {"root": NAME, "push": [VALUE, ...]} (arrays), {"root": NAME, "insert": [INDEX, "text"]} (text).
// VALUE is plain JSON (stored as a Yjs "any" value) or a shared type: {"$map": {...}},
// {"$array": [...]}, {"$text": "..."}.

import * as Y from "yjs";

// Yjs logs through console.log (e.g. when it renames its client); stdout carries only the answer.
console.log = (...args) => console.error(...args);

const b64decode = (text) => new Uint8Array(Buffer.from(text, "base64"));
const b64encode = (bytes) => Buffer.from(bytes).toString("base64");

function root(doc, name, kind) {
  if (kind === "map") return doc.getMap(name);
  if (kind === "array") return doc.getArray(name);
  if (kind === "text") return doc.getText(name);
  throw new Error(`unknown root kind ${JSON.stringify(kind)} for ${JSON.stringify(name)}`);
}

function isMarked(value, marker) {
  return value !== null && typeof value === "object" && !Array.isArray(value) &&
    Object.keys(value).length === 1 && marker in value;
}

// A shared type for a marked value, the plain value otherwise.
function build(value) {
  if (isMarked(value, "$map")) {
    const map = new Y.Map();
    for (const [key, inner] of Object.entries(value.$map)) map.set(key, build(inner));
    return map;
  }
  if (isMarked(value, "$array")) {
    const array = new Y.Array();
    array.push(value.$array.map(build));
    return array;
  }
  if (isMarked(value, "$text")) return new Y.Text(value.$text);
  return value;
}

function toJSON(doc, roots) {
  const out = {};
  for (const [name, kind] of Object.entries(roots)) out[name] = root(doc, name, kind).toJSON();
  return out;
}

function edit(doc, roots, change) {
  const target = root(doc, change.root, roots[change.root]);
  if ("set" in change) for (const [key, value] of Object.entries(change.set)) target.set(key, build(value));
  else if ("delete" in change) for (const key of change.delete) target.delete(key);
  else if ("push" in change) target.push(change.push.map(build));
  else if ("insert" in change) target.insert(change.insert[0], change.insert[1]);
  else throw new Error(`unknown edit ${JSON.stringify(change)}`);
}

function handle(request) {
  const doc = new Y.Doc();
  const roots = request.roots;
  if (request.op === "decode") {
    for (const update of request.updates) Y.applyUpdate(doc, b64decode(update));
    return { json: toJSON(doc, roots) };
  }
  if (request.op === "encode") {
    for (const update of request.base || []) Y.applyUpdate(doc, b64decode(update));
    // Set after the base: Yjs renames a client whose id shows up in a remote update.
    if (request.client_id !== undefined) doc.clientID = request.client_id;
    const before = Y.encodeStateVector(doc);
    doc.transact(() => { for (const change of request.edits) edit(doc, roots, change); });
    return { update: b64encode(Y.encodeStateAsUpdate(doc, before)), json: toJSON(doc, roots) };
  }
  throw new Error(`unknown op ${JSON.stringify(request.op)}`);
}

const chunks = [];
process.stdin.on("data", (chunk) => chunks.push(chunk));
process.stdin.on("end", () => {
  try {
    const answer = handle(JSON.parse(Buffer.concat(chunks).toString("utf8")));
    // BigInt (Yjs's reading of a 64-bit integer) has no JSON form: print it as a decimal string
    // tagged so the caller sees the difference instead of a crash.
    process.stdout.write(JSON.stringify(answer, (_k, v) => (typeof v === "bigint" ? { $bigint: v.toString() } : v)));
  } catch (error) {
    process.stderr.write(`yjs_bridge: ${error && error.stack ? error.stack : error}\n`);
    process.exit(1);
  }
});

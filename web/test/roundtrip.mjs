// Node side of tests/test_web_node.py: the page's crypto path (web/static/hekeys.js) outside a browser.
//   node roundtrip.mjs encrypt DIR   reads DIR/request.json {params, values}; writes DIR/secret.key,
//                                    DIR/bundle.keys, DIR/input.ct (all SEAL 4.1, uncompressed)
//   node roundtrip.mjs decrypt DIR   reads DIR/request.json, the keys and DIR/answer.ct;
//                                    prints {"coefficients": [...]} (the first `read` of them)
import { readFileSync, writeFileSync } from "node:fs";
import initialize from "node-seal/throws";
import { HeSession } from "../static/hekeys.js";

const [command, dir] = process.argv.slice(2);
const request = JSON.parse(readFileSync(`${dir}/request.json`, "utf8"));
const seal = await initialize();
const session = new HeSession(seal, request.params);
if (command === "encrypt") {
  const { secretKey, bundle } = session.generate();
  writeFileSync(`${dir}/secret.key`, secretKey);
  writeFileSync(`${dir}/bundle.keys`, bundle);
  writeFileSync(`${dir}/input.ct`, session.encryptCoefficients(Float64Array.from(request.values)));
} else if (command === "decrypt") {
  session.use(new Uint8Array(readFileSync(`${dir}/secret.key`)), new Uint8Array(readFileSync(`${dir}/bundle.keys`)));
  const coefficients = session.decryptCoefficients(new Uint8Array(readFileSync(`${dir}/answer.ct`)));
  process.stdout.write(JSON.stringify({ coefficients: Array.from(coefficients.subarray(0, request.read)) }));
} else {
  throw new Error(`unknown command ${command}`);
}

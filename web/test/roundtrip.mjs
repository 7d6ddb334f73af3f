// Node side of tests/test_web_node.py: the page's crypto path (web/static/hekeys.js) outside a browser.
//   node roundtrip.mjs encrypt DIR   reads DIR/request.json {params, values}; writes DIR/secret.key,
//                                    DIR/bundle.keys, DIR/input.ct (all SEAL 4.1, uncompressed)
//   node roundtrip.mjs decrypt-coeff DIR   reads DIR/answer.eic (encinfer/he/coeff.py's answer format);
//                                    prints {"scores": [...]}
//   DIR/common-a.bin, when present: the public key's common polynomial a (u64 words)
//   node roundtrip.mjs decrypt DIR   reads DIR/request.json, the keys and DIR/answer.ct;
//                                    prints {"coefficients": [...]} (the first `read` of them)
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import initialize from "node-seal/throws";
import { HeSession } from "../static/hekeys.js";
import { coefficientsToSlots, slotsToCoefficients } from "../static/slots.js";

const [command, dir] = process.argv.slice(2);
const request = JSON.parse(readFileSync(`${dir}/request.json`, "utf8"));
const seal = await initialize();
const params = { ...request.params };
if (existsSync(`${dir}/common-a.bin`)) params.commonA = new BigUint64Array(new Uint8Array(readFileSync(`${dir}/common-a.bin`)).buffer);
const session = new HeSession(seal, params);
if (command === "encrypt") {
  const { secretKey, bundle } = session.generate();
  writeFileSync(`${dir}/secret.key`, secretKey);
  writeFileSync(`${dir}/bundle.keys`, bundle);
  writeFileSync(`${dir}/input.ct`, session.encryptCoefficients(Float64Array.from(request.values)));
  // An asymmetric encryption under the bundle's public key, for the public key's own check.
  const plain = session.codec.encode(Float64Array.from(request.values), 2 ** request.params.inputScaleBits);
  const ct = new seal.Ciphertext();
  session.encryptor.encrypt(plain, ct);
  const back = new seal.Plaintext();
  session.decryptor.decrypt(ct, back);
  const got = session.codec.decode(back);
  writeFileSync(`${dir}/public-roundtrip.json`, JSON.stringify(Array.from(got.subarray(0, request.values.length))));
} else if (command === "decrypt") {
  session.use(new Uint8Array(readFileSync(`${dir}/secret.key`)), new Uint8Array(readFileSync(`${dir}/bundle.keys`)));
  const coefficients = session.decryptCoefficients(new Uint8Array(readFileSync(`${dir}/answer.ct`)));
  process.stdout.write(JSON.stringify({ coefficients: Array.from(coefficients.subarray(0, request.read)) }));
} else if (command === "slots") {
  // A plaintext saved by the services' SEAL (bridged) -> its slots by the page's decoder.
  const plain = new seal.Plaintext();
  plain.loadFromArray(session.context, new Uint8Array(readFileSync(`${dir}/plain.pt`)));
  const { re, im } = coefficientsToSlots(session.codec.decode(plain), request.params.polyModulusDegree);
  // And the page's encoder: the same slots -> coefficients -> a plaintext for the services to decode.
  const coeffs = slotsToCoefficients(Float64Array.from(request.re), Float64Array.from(request.im), request.params.polyModulusDegree);
  writeFileSync(`${dir}/page.pt`, session.codec.encode(coeffs, 2 ** 30).saveToArray(seal.ComprModeType.none));
  process.stdout.write(JSON.stringify({ re: Array.from(re), im: Array.from(im) }));
} else if (command === "decrypt-coeff") {
  session.use(new Uint8Array(readFileSync(`${dir}/secret.key`)), new Uint8Array(readFileSync(`${dir}/bundle.keys`)));
  const scores = session.decryptCoeffAnswer(new Uint8Array(readFileSync(`${dir}/answer.eic`)), request.answerLayout);
  process.stdout.write(JSON.stringify({ scores }));
} else {
  throw new Error(`unknown command ${command}`);
}

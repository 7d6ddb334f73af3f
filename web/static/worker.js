// The page's HE worker: SEAL (node-seal, WebAssembly) off the main thread, so drawing stays smooth.
// It holds the secret key; it hands out only public bundles, ciphertexts and decrypted scores.
import initialize from "./vendor/node-seal/index_throws.js";
import { HeSession } from "./hekeys.js";
import { getKeys, putKeys, deleteKeys } from "./keystore-idb.js";

let seal = null;
let session = null;
let storeName = "";

const now = () => performance.now();

async function init({ params, name }) {
  const t0 = now();
  if (!seal) seal = await initialize();
  const initMs = now() - t0;
  const t1 = now();
  session = new HeSession(seal, params);
  storeName = name;
  const stored = await getKeys(name);
  let fresh = false, keygenMs = 0;
  if (stored) {
    session.use(stored.secretKey, stored.bundle);
  } else {
    const { secretKey, bundle } = session.generate();
    keygenMs = now() - t1;
    await putKeys(name, { secretKey, bundle, keyId: "", created: Date.now() });
    fresh = true;
  }
  const record = await getKeys(name);
  return { initMs, keygenMs, fresh, keyId: record.keyId, bundleBytes: record.bundle.length };
}

const ops = {
  init,
  async bundle() { return { bundle: (await getKeys(storeName)).bundle }; },
  async setKeyId({ keyId }) {
    const record = await getKeys(storeName);
    await putKeys(storeName, { ...record, keyId });
    return {};
  },
  async forget() { await deleteKeys(storeName); return {}; },
  async encrypt({ values }) {
    const t = now();
    const ciphertext = session.encryptCoefficients(Float64Array.from(values));
    return { ciphertext, ms: now() - t };
  },
  async decrypt({ ciphertexts }) {
    const t = now();
    const coefficients = ciphertexts.map((c) => Array.from(session.decryptCoefficients(c)));
    return { coefficients, ms: now() - t };
  },
  async decryptCoeff({ answer, layout }) {
    const t = now();
    const scores = session.decryptCoeffAnswer(answer, layout);
    return { coefficients: scores, ms: now() - t };
  },
};

self.onmessage = async ({ data: { id, op, args } }) => {
  try {
    self.postMessage({ id, ok: true, result: await ops[op](args || {}) });
  } catch (e) {
    self.postMessage({ id, ok: false, error: (e && e.message) || String(e) });
  }
};

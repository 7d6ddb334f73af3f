// Keys for one CKKS context: the secret key stays with the caller; the public bundle
// ("encinfer-keys-v1", see encinfer/he/keys.py) is what goes to the key store.
//
//   magic b"encinfer-keys-v1", then sections: tag (4 ASCII bytes), arg (u32 LE), length (u64 LE), payload
//   PARM EncryptionParameters, PUBK PublicKey (seeded), RELK RelinKeys (seeded),
//   GALK GaloisKeys holding one key (arg = its Galois element), END_ (empty)
//
// Every SEAL object is saved uncompressed (ComprModeType.none): the gateway checks and rewrites
// SEAL's version in every nested header, which it cannot do inside a compressed stream.

import { makeContext, CoeffCodec } from "./sealcoeff.js";

const MAGIC = new TextEncoder().encode("encinfer-keys-v1");

export function buildBundle(sections) {
  const parts = [MAGIC];
  for (const [tag, arg, payload] of [...sections, ["END_", 0, new Uint8Array(0)]]) {
    const head = new Uint8Array(16);
    head.set(new TextEncoder().encode(tag), 0);
    const v = new DataView(head.buffer);
    v.setUint32(4, arg, true);
    v.setBigUint64(8, BigInt(payload.length), true);
    parts.push(head, payload);
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** The payload of the first section with `tag` in a bundle this module built. */
export function bundleSection(bundle, tag) {
  const v = new DataView(bundle.buffer, bundle.byteOffset, bundle.byteLength);
  let at = MAGIC.length;
  for (let i = 0; i < 40000 && at + 16 <= bundle.length; i++) {
    const t = new TextDecoder().decode(bundle.subarray(at, at + 4));
    const length = Number(v.getBigUint64(at + 8, true));
    if (t === tag) return bundle.slice(at + 16, at + 16 + length);
    if (t === "END_") break;
    at += 16 + length;
  }
  return null;
}

/** SEAL's Galois element for a rotation by `step` slots (encinfer/he/keys.py _rotation_element). */
export function rotationElement(step, n) {
  const m = BigInt(2 * n);
  let e = 1n;
  const s = ((step % (n / 2)) + n / 2) % (n / 2);
  for (let i = 0; i < s; i++) e = (e * 3n) % m;
  return Number(e);
}

/** A session for the parameters GetModelInfo states: context, codec, keys (new or loaded). */
export class HeSession {
  constructor(seal, params) {
    this.seal = seal;
    this.params = params;
    const { parms, context } = makeContext(seal, params.polyModulusDegree, params.coeffModulusBits);
    this.parms = parms;
    this.context = context;
    this.codec = new CoeffCodec(seal, context);
  }

  /** New keys; returns { secretKey, bundle } as bytes. */
  generate() {
    const seal = this.seal;
    const none = seal.ComprModeType.none;
    const keygen = new seal.KeyGenerator(this.context);
    const sections = [["PARM", 0, this.parms.saveToArray(none)]];
    const pub = keygen.createPublicKeySerializable();
    sections.push(["PUBK", 0, pub.saveToArray(none)]);
    pub.delete();
    if (this.params.needsRelinKeys) {
      const relin = keygen.createRelinKeysSerializable();
      sections.push(["RELK", 0, relin.saveToArray(none)]);
      relin.delete();
    }
    const galois = (this.params.galoisSteps || []).map((s) => [rotationElement(s, this.params.polyModulusDegree), s]);
    // SEAL's step 0 is complex conjugation (Galois element 2N - 1).
    if (this.params.needsConjugationKey) galois.push([2 * this.params.polyModulusDegree - 1, 0]);
    galois.sort((a, b) => a[0] - b[0]);
    for (const [element, step] of galois) {
      const keys = keygen.createGaloisKeysSerializableWithSteps(Int32Array.of(step));
      sections.push(["GALK", element, keys.saveToArray(none)]);
      keys.delete();
    }
    const secretKey = keygen.secretKey().saveToArray(none);
    keygen.delete();
    const bundle = buildBundle(sections);
    this.use(secretKey, bundle);
    return { secretKey, bundle };
  }

  /** Loads stored keys: the secret key, and the public key from the bundle's PUBK section. */
  use(secretKeyBytes, bundle) {
    const seal = this.seal;
    this.secretKey = new seal.SecretKey();
    this.secretKey.loadFromArray(this.context, secretKeyBytes);
    const pubBytes = bundleSection(bundle, "PUBK");
    if (!pubBytes) throw new Error("stored key bundle has no public key");
    const publicKey = new seal.PublicKey();
    publicKey.loadFromArray(this.context, pubBytes);
    this.encryptor = new seal.Encryptor(this.context, publicKey, this.secretKey);
    this.decryptor = new seal.Decryptor(this.context, this.secretKey);
  }

  /** A seeded symmetric encryption of sum_i values[i] X^i at 2^inputScaleBits, uncompressed. */
  encryptCoefficients(values) {
    const plain = this.codec.encode(values, 2 ** this.params.inputScaleBits);
    const ct = this.encryptor.encryptSymmetricSerializable(plain);
    const bytes = ct.saveToArray(this.seal.ComprModeType.none);
    ct.delete();
    plain.delete();
    return bytes;
  }

  /** The coefficients of a ciphertext (this SEAL's version, uncompressed), divided by its scale. */
  decryptCoefficients(bytes) {
    const ct = new this.seal.Ciphertext();
    const plain = new this.seal.Plaintext();
    try {
      ct.loadFromArray(this.context, bytes);
      this.decryptor.decrypt(ct, plain);
      return this.codec.decode(plain);
    } finally {
      ct.delete();
      plain.delete();
    }
  }
}

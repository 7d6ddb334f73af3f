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
    const key = context.keyContextData().parms().coeffModulus();
    this.keyPrimes = Array.from({ length: key.size() }, (_, i) => key.get(i).value());
  }

  /** New keys; returns { secretKey, bundle } as bytes. */
  generate() {
    const seal = this.seal;
    const none = seal.ComprModeType.none;
    const keygen = new seal.KeyGenerator(this.context);
    const sections = [["PARM", 0, this.parms.saveToArray(none)]];
    const secretKey = keygen.secretKey().saveToArray(none);
    if (this.params.commonA) {
      sections.push(["PUBK", 0, this._publicKeyOnCommonA(keygen, secretKey, this.params.commonA)]);
    } else {
      const pub = keygen.createPublicKeySerializable();
      sections.push(["PUBK", 0, pub.saveToArray(none)]);
      pub.delete();
    }
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
    keygen.delete();
    const bundle = buildBundle(sections);
    this.use(secretKey, bundle);
    return { secretKey, bundle };
  }

  /**
   * A public key (-a*s + e, a) on the service's common polynomial a (NTT form, key level, prime
   * by prime; encinfer/he/coeff.py): SEAL makes (b', a') = (-a'*s + e, a') for its own a', and in
   * NTT form everything is pointwise, so b = b' - (a - a') * s word by word mod each prime.
   * Saved in full (not seeded: its a is not SEAL's PRNG output).
   */
  _publicKeyOnCommonA(keygen, secretKeyBytes, commonA) {
    const seal = this.seal;
    const pk = keygen.createPublicKey();
    const bytes = pk.saveToArray(seal.ComprModeType.none);
    pk.delete();
    const n = this.params.polyModulusDegree, primes = this.keyPrimes, size = n * primes.length;
    const ctData = 16 + 73 + 16 + 8, skData = 16 + 32 + 16 + 16 + 8;
    if (bytes.length !== ctData + 16 * size || secretKeyBytes.length !== skData + 8 * size || commonA.length !== size) {
      throw new Error("unexpected key sizes for these parameters");
    }
    const pkView = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const sk = new DataView(secretKeyBytes.buffer, secretKeyBytes.byteOffset, secretKeyBytes.byteLength);
    for (let i = 0; i < size; i++) {
      const q = primes[Math.floor(i / n)];
      const b = pkView.getBigUint64(ctData + 8 * i, true), a1 = pkView.getBigUint64(ctData + 8 * (size + i), true);
      const s = sk.getBigUint64(skData + 8 * i, true), a = commonA[i];
      let v = (b - ((a + q - a1) % q) * s) % q;
      if (v < 0n) v += q;
      pkView.setBigUint64(ctData + 8 * i, v, true);
      pkView.setBigUint64(ctData + 8 * (size + i), a, true);
    }
    const check = new seal.PublicKey();
    check.loadFromArray(this.context, bytes); // SEAL's own checks of sizes and residues
    check.delete();
    return bytes;
  }

  /** The secret key's coefficients (ternary), from its NTT form at the first prime. */
  secretCoefficients() {
    if (!this._secretCoeffs) {
      const bytes = this.secretKey.saveToArray(this.seal.ComprModeType.none);
      const start = 16 + 32 + 16 + 16 + 8, n = this.params.polyModulusDegree;
      const words = new BigUint64Array(bytes.slice(start, start + 8 * this.codec.words).buffer);
      const residues = this.codec.inverseNtt(words);
      const q = this.codec.primes[0], out = new Int8Array(n);
      for (let i = 0; i < n; i++) {
        const r = residues[i];
        out[i] = r === 0n ? 0 : r === 1n ? 1 : r === q - 1n ? -1 : 2;
        if (out[i] === 2) throw new Error("the secret key is not ternary");
      }
      this._secretCoeffs = out;
    }
    return this._secretCoeffs;
  }

  /**
   * Scores from a coefficient-layout answer (encinfer/he/coeff.py's "EIC1" wire format):
   * c0 at the outputs, every product's c1 in full, all mod 2^answer_bits. Output r of product
   * g = r div T sits at coefficient t*F + F - 1 (t = r mod T); its value is
   * c0[r] + (c1_g * s)[pos] (negacyclic), computed here exactly (c1 split in 24-bit halves).
   */
  decryptCoeffAnswer(bytes, layout) {
    const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const magic = new TextDecoder().decode(bytes.subarray(0, 4));
    const n = this.params.polyModulusDegree, t = layout.rowsPerProduct, f = layout.nFeatures;
    const outputs = layout.nOutputs, products = Math.ceil(outputs / t), bits = layout.answerBits;
    if (bytes.length < 16 || magic !== "EIC1") throw new Error("the answer is not a coefficient-layout answer");
    const head = [v.getUint8(4), v.getUint8(5), v.getUint16(6, true), v.getUint16(8, true), v.getUint16(10, true), v.getUint32(12, true)];
    if (head.join() !== [bits, 0, products, outputs, 0, n].join()) {
      throw new Error(`the answer's header (${head}) does not match the layout (${[bits, 0, products, outputs, 0, n]})`);
    }
    const width = bits / 8;
    if (bytes.length !== 16 + (outputs + products * n) * width) throw new Error(`the answer has ${bytes.length} bytes`);
    const word = (k) => { let x = 0; for (let b = width - 1; b >= 0; b--) x = x * 256 + bytes[16 + k * width + b]; return x; };
    const s = this.secretCoefficients();
    const modulus = 1n << BigInt(bits), q = Number(this.codec.primes[0]);
    const unit = (q / 2 ** bits) / 2 ** this.params.outputScaleBits;
    const scores = [];
    for (let r = 0; r < outputs; r++) {
      const g = Math.floor(r / t), pos = (r % t) * f + f - 1, base = outputs + g * n;
      let hi = 0, lo = 0;
      for (let j = 0; j < n; j++) {
        const k = pos - j, sk = k >= 0 ? s[k] : -s[k + n];
        if (!sk) continue;
        const c = word(base + j), h = Math.floor(c / 16777216), l = c - h * 16777216;
        hi += sk * h; lo += sk * l;
      }
      let total = (BigInt(word(r)) + BigInt(hi) * 16777216n + BigInt(lo)) % modulus;
      if (total < 0n) total += modulus;
      if (total >= modulus / 2n) total -= modulus;
      scores.push(Number(total) * unit);
    }
    const capacity = 2 ** (this.params.coeffModulusBits[0] - 2 - this.params.outputScaleBits);
    if (!scores.every((x) => Math.abs(x) <= capacity)) {
      throw new Error("the decrypted answer is out of range: it was not computed for this secret key and model");
    }
    return scores;
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

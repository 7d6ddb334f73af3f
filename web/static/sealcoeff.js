// Coefficient encoding with node-seal, which has no complex CKKS encoder.
//
// A CKKS plaintext holds its polynomial in NTT form, and SEAL refuses to load a CKKS plaintext
// in coefficient form. A ciphertext, though, may be loaded in coefficient form (SEAL's checks
// are on its sizes and residues, not its form), and SEAL's own Evaluator moves a ciphertext into
// and out of NTT form. So the polynomial goes in as c0 of a coefficient-form ciphertext, SEAL's
// WebAssembly NTT turns it into exactly the NTT-form words a plaintext needs, and those words are
// loaded as a plaintext. Decoding runs the same path backwards. Exact (integer NTT, no floating
// FFT) and as fast as SEAL's own transforms. Works in a browser worker and in Node.
//
// Byte layouts are SEAL's (ciphertext.cpp, plaintext.cpp, dynarray.h): a 16-byte SEALHeader
// (magic 0xA15E, header size 0x10, major, minor, compr_mode, reserved, total size u64), then
// the members. Only objects this SEAL saved uncompressed are read here; answers from the server
// arrive already in this SEAL's version (the gateway bridges versions).

const HEADER = 16;
const PARMS_ID = 32;
const CT_MEMBERS = PARMS_ID + 1 + 8 * 5; // parms_id, ntt flag, size, N, primes, scale, correction
const NONE = 0;

/** The CKKS context for the parameters a model's GetModelInfo states. */
export function makeContext(seal, polyModulusDegree, coeffModulusBits) {
  const parms = new seal.EncryptionParameters(seal.SchemeType.ckks);
  parms.setPolyModulusDegree(polyModulusDegree);
  parms.setCoeffModulus(seal.CoeffModulus.Create(polyModulusDegree, Int32Array.from(coeffModulusBits)));
  const context = new seal.SEALContext(parms, true, seal.SecLevelType.tc128);
  if (!context.parametersSet()) throw new Error(`SEAL refuses these parameters (N=${polyModulusDegree}, ` +
    `moduli ${coeffModulusBits}): ${context.toHuman()}`);
  return { parms, context };
}

function header(bytes, what) {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < HEADER || v.getUint16(0, true) !== 0xa15e || bytes[2] !== HEADER) {
    throw new Error(`${what} is not a SEAL object`);
  }
  if (bytes[5] !== NONE) throw new Error(`${what} is compressed (compr_mode ${bytes[5]}); expected none`);
  const size = Number(v.getBigUint64(8, true));
  if (size !== bytes.length) throw new Error(`${what} declares ${size} bytes, has ${bytes.length}`);
  return { major: bytes[3], minor: bytes[4] };
}

function writeHeader(out, at, version, size) {
  const v = new DataView(out.buffer, out.byteOffset + at, HEADER);
  v.setUint16(0, 0xa15e, true);
  out[at + 2] = HEADER;
  out[at + 3] = version.major;
  out[at + 4] = version.minor;
  out[at + 5] = NONE;
  v.setUint16(6, 0, true);
  v.setBigUint64(8, BigInt(size), true);
}

/** Encodes and decodes polynomials by their coefficients for one SEAL context (first level). */
export class CoeffCodec {
  constructor(seal, context) {
    this.seal = seal;
    this.context = context;
    this.evaluator = new seal.Evaluator(context);
    const data = context.firstContextData();
    this.n = data.parms().polyModulusDegree();
    const moduli = data.parms().coeffModulus();
    this.primes = Array.from({ length: moduli.size() }, (_, i) => moduli.get(i).value());
    // parms_id and this SEAL's version, from an object SEAL saved itself.
    const probe = new seal.Plaintext();
    new seal.CKKSEncoder(context).encode(Float64Array.of(0), 1, probe);
    const bytes = probe.saveToArray(seal.ComprModeType.none);
    probe.delete();
    this.version = header(bytes, "SEAL's own plaintext");
    this.parmsId = bytes.slice(HEADER, HEADER + PARMS_ID);
  }

  get words() { return this.n * this.primes.length; }

  /** A coefficient-form or NTT-form ciphertext of size 2 whose c0 and c1 are both `words`. */
  _ciphertextBytes(words, ntt, scale) {
    const count = 2 * this.words;
    const size = HEADER + CT_MEMBERS + HEADER + 8 + 8 * count;
    const out = new Uint8Array(size);
    const v = new DataView(out.buffer);
    writeHeader(out, 0, this.version, size);
    out.set(this.parmsId, HEADER);
    let p = HEADER + PARMS_ID;
    out[p] = ntt ? 1 : 0;
    v.setBigUint64(p + 1, 2n, true);
    v.setBigUint64(p + 9, BigInt(this.n), true);
    v.setBigUint64(p + 17, BigInt(this.primes.length), true);
    v.setFloat64(p + 25, scale, true);
    v.setBigUint64(p + 33, 1n, true); // correction factor
    p = HEADER + CT_MEMBERS;
    writeHeader(out, p, this.version, HEADER + 8 + 8 * count);
    v.setBigUint64(p + HEADER, BigInt(count), true);
    const base = p + HEADER + 8;
    for (let i = 0; i < this.words; i++) {
      v.setBigUint64(base + 8 * i, words[i], true);
      // c1 is never read; it only has to be a valid non-zero polynomial (node-seal refuses
      // transparent ciphertexts).
      v.setBigUint64(base + 8 * (this.words + i), words[i] === 0n ? 1n : words[i], true);
    }
    return out;
  }

  _c0(ciphertext) {
    const bytes = ciphertext.saveToArray(this.seal.ComprModeType.none);
    header(bytes, "SEAL's own ciphertext");
    const start = HEADER + CT_MEMBERS + HEADER + 8;
    return new BigUint64Array(bytes.slice(start, start + 8 * this.words).buffer);
  }

  /** NTT-form words of the polynomial with integer coefficients `ints` (BigInt, any sign). */
  _ntt(ints) {
    const words = new BigUint64Array(this.words);
    this.primes.forEach((q, j) => {
      for (let i = 0; i < this.n; i++) {
        let r = ints[i] % q;
        if (r < 0n) r += q;
        words[j * this.n + i] = r;
      }
    });
    const ct = new this.seal.Ciphertext();
    try {
      ct.loadFromArray(this.context, this._ciphertextBytes(words, false, 1));
      this.evaluator.cipherTransformToNttInplace(ct);
      return this._c0(ct);
    } finally {
      ct.delete();
    }
  }

  /**
   * The plaintext sum_i round(values[i] * scale) X^i (values shorter than N: the rest are 0),
   * in NTT form at `scale`, ready for encryption.
   */
  encode(values, scale) {
    if (values.length > this.n) throw new Error(`${values.length} coefficients; the ring has ${this.n}`);
    const ints = new Array(this.n).fill(0n);
    for (let i = 0; i < values.length; i++) {
      const r = Math.round(values[i] * scale);
      if (!Number.isSafeInteger(r)) throw new Error(`coefficient ${i} (${values[i]}) is too large at this scale`);
      ints[i] = BigInt(r);
    }
    return this.plaintextFromNtt(this._ntt(ints), scale);
  }

  /** A plaintext from NTT-form words (SEAL's Plaintext layout, this SEAL's version). */
  plaintextFromNtt(words, scale) {
    const size = HEADER + PARMS_ID + 16 + HEADER + 8 + 8 * this.words;
    const out = new Uint8Array(size);
    const v = new DataView(out.buffer);
    writeHeader(out, 0, this.version, size);
    out.set(this.parmsId, HEADER);
    let p = HEADER + PARMS_ID;
    v.setBigUint64(p, BigInt(this.words), true);
    v.setFloat64(p + 8, scale, true);
    p += 16;
    writeHeader(out, p, this.version, HEADER + 8 + 8 * this.words);
    v.setBigUint64(p + HEADER, BigInt(this.words), true);
    for (let i = 0; i < this.words; i++) v.setBigUint64(p + HEADER + 8 + 8 * i, words[i], true);
    const plain = new this.seal.Plaintext();
    plain.loadFromArray(this.context, out);
    return plain;
  }

  /** Coefficient-form residues (prime by prime) of NTT-form words, through SEAL's inverse NTT. */
  inverseNtt(words, scale = 1) {
    const ct = new this.seal.Ciphertext();
    try {
      ct.loadFromArray(this.context, this._ciphertextBytes(words, true, scale));
      this.evaluator.cipherTransformFromNttInplace(ct);
      return this._c0(ct);
    } finally {
      ct.delete();
    }
  }

  /**
   * The coefficients of an NTT-form plaintext (a decryption), divided by its scale.
   * Read from the first prime, centred: exact while |coefficient| < q0 / 2.
   */
  decode(plain) {
    const bytes = plain.saveToArray(this.seal.ComprModeType.none);
    header(bytes, "SEAL's own plaintext");
    const scale = new DataView(bytes.buffer).getFloat64(HEADER + PARMS_ID + 8, true);
    const start = HEADER + PARMS_ID + 16 + HEADER + 8;
    const count = (bytes.length - start) / 8;
    if (count !== this.words) throw new Error(`plaintext holds ${count} words, ${this.words} expected`);
    const coeffs = this.inverseNtt(new BigUint64Array(bytes.slice(start).buffer), scale);
    const q = this.primes[0];
    const half = q >> 1n;
    const out = new Float64Array(this.n);
    for (let i = 0; i < this.n; i++) {
      const c = coeffs[i];
      out[i] = Number(c > half ? c - q : c) / scale;
    }
    return out;
  }
}

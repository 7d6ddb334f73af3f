// gRPC-Web (unary) and the few protobuf messages the page uses, written by hand.
//
// Why by hand: the page calls five unary methods with flat messages; a protobuf runtime, generated
// stubs and a gRPC-Web transport (about 100 KB and a code generator in the build) would be most of
// the page's JavaScript. Field numbers follow protos/encinfer/v1/*.proto; tests/test_web_browser.py
// exercises every message against the real services.

const enc = new TextEncoder();
const dec = new TextDecoder();

// ---------------------------------------------------------------- protobuf wire format

class Writer {
  constructor() { this.parts = []; this.length = 0; }
  _push(bytes) { this.parts.push(bytes); this.length += bytes.length; }
  varint(v) {
    let n = BigInt.asUintN(64, BigInt(v));
    const out = [];
    do { let b = Number(n & 0x7fn); n >>= 7n; if (n) b |= 0x80; out.push(b); } while (n);
    this._push(Uint8Array.from(out));
  }
  tag(field, wire) { this.varint((field << 3) | wire); }
  bytes(field, value) { if (!value || !value.length) return; this.tag(field, 2); this.varint(value.length); this._push(value); }
  string(field, value) { if (value) this.bytes(field, enc.encode(value)); }
  uint(field, value) { if (value) { this.tag(field, 0); this.varint(value); } }
  message(field, writer) { this.tag(field, 2); this.varint(writer.length); for (const p of writer.parts) this._push(p); }
  finish() {
    const out = new Uint8Array(this.length);
    let at = 0;
    for (const p of this.parts) { out.set(p, at); at += p.length; }
    return out;
  }
}

/** Fields of one message: number -> list of values (BigInt for varints, Uint8Array for bytes). */
export function parse(bytes) {
  const fields = new Map();
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  const varint = () => {
    let v = 0n, shift = 0n;
    for (let i = 0; i < 10; i++) {
      if (at >= bytes.length) throw new Error("truncated protobuf message");
      const b = bytes[at++];
      v |= BigInt(b & 0x7f) << shift;
      if (b < 0x80) return v;
      shift += 7n;
    }
    throw new Error("bad varint");
  };
  while (at < bytes.length) {
    const key = Number(varint());
    const field = key >>> 3, wire = key & 7;
    let value;
    if (wire === 0) value = varint();
    else if (wire === 1) { value = view.getFloat64(at, true); at += 8; }
    else if (wire === 5) { value = view.getUint32(at, true); at += 4; }
    else if (wire === 2) {
      const n = Number(varint());
      if (at + n > bytes.length) throw new Error("truncated protobuf field");
      value = bytes.subarray(at, at + n); at += n;
    } else throw new Error(`protobuf wire type ${wire}`);
    if (!fields.has(field)) fields.set(field, []);
    fields.get(field).push(value);
  }
  return fields;
}

const one = (f, n, d) => (f.has(n) ? f.get(n).at(-1) : d);
const str = (f, n) => (f.has(n) ? dec.decode(one(f, n)) : "");
const num = (f, n) => Number(one(f, n, 0n));
const sint32 = (v) => Number(BigInt.asIntN(32, BigInt.asUintN(64, v)));
/** A repeated scalar: packed (one length-delimited field) or not. */
function repeated(f, n, signed = false) {
  const out = [];
  for (const v of f.get(n) || []) {
    if (v instanceof Uint8Array) {
      let at = 0;
      while (at < v.length) {
        let x = 0n, shift = 0n, b;
        do { b = v[at++]; x |= BigInt(b & 0x7f) << shift; shift += 7n; } while (b >= 0x80 && at < v.length);
        out.push(signed ? sint32(x) : Number(x));
      }
    } else out.push(signed ? sint32(v) : Number(v));
  }
  return out;
}

// ---------------------------------------------------------------- messages

const LAYOUTS = { 0: "unspecified", 1: "latency", 2: "batch", 3: "coeff" };
export const LAYOUT_NUMBERS = { latency: 1, batch: 2, coeff: 3 };

function ckksParameters(b) {
  const f = parse(b);
  return {
    polyModulusDegree: num(f, 1), coeffModulusBits: repeated(f, 2), inputScaleBits: num(f, 3),
    outputScaleBits: num(f, 4), galoisSteps: repeated(f, 5, true), needsRelinKeys: num(f, 6) === 1,
    needsConjugationKey: num(f, 7) === 1, complexPacking: num(f, 8) === 1, needsPublicKey: num(f, 9) === 1,
  };
}

function layoutInfo(b) {
  const f = parse(b);
  const layout = num(f, 1);
  return {
    layout: LAYOUTS[layout] || `layout ${layout}`, layoutNumber: layout,
    parameters: f.has(2) ? ckksParameters(one(f, 2)) : null, blockSize: num(f, 3),
    outputSlots: repeated(f, 4), featureIndices: repeated(f, 5), maxSamples: num(f, 6),
    manifestSha256: str(f, 7), inputMin: one(f, 8, 0), inputMax: one(f, 9, 0),
    rowsPerProduct: num(f, 10), answerBits: num(f, 11),
  };
}

export function modelInfo(b) {
  const f = parse(b);
  return {
    name: str(f, 1), version: str(f, 2), kind: str(f, 3), nFeatures: num(f, 4), nOutputs: num(f, 5),
    classLabels: (f.get(6) || []).map((v) => dec.decode(v)), layouts: (f.get(7) || []).map(layoutInfo),
    sha256: str(f, 9), worker: str(f, 10),
  };
}

export function keyRecord(b) {
  const f = parse(b);
  const seconds = (n) => (f.has(n) ? num(parse(one(f, n)), 1) : 0);
  return { keyId: str(f, 1), sizeBytes: num(f, 2), owner: str(f, 5), created: seconds(6), expires: seconds(7) };
}

export function predictResponse(b) {
  const f = parse(b);
  const status = f.has(2) ? parse(one(f, 2)) : new Map();
  return {
    requestId: str(f, 1), code: num(status, 1), message: str(status, 2),
    ciphertexts: (f.get(3) || []).map((v) => v.slice()), nSamples: num(f, 4), serverMs: one(f, 5, 0),
  };
}

export const requests = {
  getModelInfo: (model) => { const w = new Writer(); w.string(1, model); return w.finish(); },
  statKeys: (keyId) => { const w = new Writer(); w.string(1, keyId); return w.finish(); },
  putKeysUnary: (bundle, labels = {}, ttlSeconds = 0) => {
    const header = new Writer();
    for (const [k, v] of Object.entries(labels)) {
      const entry = new Writer();
      entry.string(1, k);
      entry.string(2, v);
      header.message(1, entry);
    }
    header.uint(2, bundle.length);
    header.uint(3, ttlSeconds);
    const w = new Writer();
    w.message(1, header);
    w.bytes(2, bundle);
    return w.finish();
  },
  predict: (model, keyId, requestId, ciphertext, layout = 0) => {
    const w = new Writer();
    w.string(1, model); w.string(2, keyId); w.string(3, requestId); w.bytes(4, ciphertext); w.uint(5, layout);
    return w.finish();
  },
};

// ---------------------------------------------------------------- gRPC-Web

export const Code = { OK: 0, CANCELLED: 1, UNKNOWN: 2, INVALID_ARGUMENT: 3, DEADLINE_EXCEEDED: 4, NOT_FOUND: 5,
  ALREADY_EXISTS: 6, PERMISSION_DENIED: 7, RESOURCE_EXHAUSTED: 8, FAILED_PRECONDITION: 9, ABORTED: 10,
  OUT_OF_RANGE: 11, UNIMPLEMENTED: 12, INTERNAL: 13, UNAVAILABLE: 14, DATA_LOSS: 15, UNAUTHENTICATED: 16 };
const CODE_NAMES = Object.fromEntries(Object.entries(Code).map(([k, v]) => [v, k]));

export class RpcError extends Error {
  constructor(code, message, method) {
    super(message);
    this.code = code;
    this.codeName = CODE_NAMES[code] || `code ${code}`;
    this.method = method;
  }
}

/** {name: ms} from a Server-Timing header. */
function serverTiming(header) {
  const out = {};
  for (const part of (header || "").split(",")) {
    const m = /^\s*([\w-]+)\s*;\s*dur=([\d.]+)/.exec(part);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

/** One unary call through the gateway (same origin). Returns the response message's bytes. */
export async function unary(method, request, { token = "", timeoutSeconds = 30, onBytes } = {}) {
  const body = new Uint8Array(5 + request.length);
  new DataView(body.buffer).setUint32(1, request.length);
  body.set(request, 5);
  const headers = { "content-type": "application/grpc-web+proto", "x-grpc-web": "1",
    "grpc-timeout": `${Math.ceil(timeoutSeconds)}S` };
  if (token) headers.authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(method, { method: "POST", headers, body, signal: AbortSignal.timeout(timeoutSeconds * 1000 + 2000) });
  } catch (e) {
    throw new RpcError(Code.UNAVAILABLE, `the page's server did not answer (${e.message}); is \`encinfer web\` running?`, method);
  }
  if (!response.ok) throw new RpcError(Code.UNAVAILABLE, `the page's server answered HTTP ${response.status}`, method);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (onBytes) onBytes(body.length, bytes.length, serverTiming(response.headers.get("server-timing")));
  let message = null, code = Number(response.headers.get("grpc-status") ?? Code.UNKNOWN);
  let details = decodeURIComponent(response.headers.get("grpc-message") || "");
  const view = new DataView(bytes.buffer);
  for (let at = 0; at + 5 <= bytes.length;) {
    const flag = bytes[at], n = view.getUint32(at + 1);
    const payload = bytes.subarray(at + 5, at + 5 + n);
    at += 5 + n;
    if (flag & 0x80) {
      for (const line of dec.decode(payload).split("\r\n")) {
        const i = line.indexOf(":");
        if (i < 0) continue;
        const key = line.slice(0, i).trim().toLowerCase(), value = line.slice(i + 1).trim();
        if (key === "grpc-status") code = Number(value);
        if (key === "grpc-message") details = decodeURIComponent(value);
      }
    } else message = payload;
  }
  if (code !== Code.OK) throw new RpcError(code, details || CODE_NAMES[code], method);
  if (message === null) throw new RpcError(Code.INTERNAL, "the answer carried no message", method);
  return message;
}

// The page: draw a digit, encrypt it in a worker, ask the service, decrypt the ten scores here.
import { Code, RpcError, keyRecord, modelInfo, parse, predictResponse, requests, unary } from "./grpcweb.js";
import { pickLayout } from "./layouts.js";

const EXPIRY_MARGIN_SECONDS = 3600; // as the Python client: re-upload keys that expire within the hour
const NO_WASM = "This browser has no WebAssembly, which the page needs to encrypt in the page. Use a current Chrome, Edge, Firefox or Safari (with WebAssembly enabled).";
const $ = (id) => document.getElementById(id);
const canvas = $("pad"), pad = canvas.getContext("2d", { willReadFrequently: true });
const state = { info: null, layout: null, ready: null, keyId: "", stats: {}, pixels: null, uploads: 0 };

// ---------------------------------------------------------------- messages

function show(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
}

/** What a person can do about an error, in words. */
function explain(e) {
  if (!(e instanceof RpcError)) return e.message || String(e);
  const where = e.method.includes("KeyStore") ? "key store" : "inference service";
  switch (e.code) {
    case Code.UNAVAILABLE: return `The ${where} is not answering right now; try again in a moment. (${e.message})`;
    case Code.DEADLINE_EXCEEDED: return `The ${where} took too long to answer: ${e.message}. Try again.`;
    case Code.UNAUTHENTICATED: return `The ${where} needs a valid token (${e.message}): paste the token you were given above.`;
    case Code.PERMISSION_DENIED: return `Your token may not do this (${e.message}).`;
    case Code.NOT_FOUND: return `Not found: ${e.message}.`;
    case Code.RESOURCE_EXHAUSTED: return `The ${where} is at a limit: ${e.message}.`;
    default: return `The ${where} refused the request (${e.codeName}): ${e.message}`;
  }
}

// ---------------------------------------------------------------- worker

const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
let nextId = 0;
const pending = new Map();
worker.onmessage = ({ data }) => {
  const { resolve, reject } = pending.get(data.id);
  pending.delete(data.id);
  data.ok ? resolve(data.result) : reject(new Error(data.error));
};
worker.onerror = (e) => {
  for (const { reject } of pending.values()) reject(new Error(`the encryption worker failed: ${e.message}`));
  pending.clear();
};
function call(op, args, transfer = []) {
  return new Promise((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, op, args }, transfer);
  });
}

// ---------------------------------------------------------------- the service

const token = () => $("token").value.trim();

async function rpc(method, request, parseAnswer) {
  const bytes = await unary(method, request, {
    token: token(),
    onBytes: (up, down, timing) => {
      state.stats.up = (state.stats.up || 0) + up;
      state.stats.down = (state.stats.down || 0) + down;
      state.lastTiming = timing;
    },
  });
  return parseAnswer(bytes);
}

async function listModel() {
  const wanted = $("model").value.trim();
  if (wanted) return wanted;
  const models = await rpc("/encinfer.v1.Inference/ListModels", new Uint8Array(0), (b) => (parse(b).get(1) || []));
  if (!models.length) throw new Error("the inference service serves no model");
  return modelInfo(models[0]).name;
}

/** Model, layout, keys (made or loaded in the worker), uploaded if the key store lacks them. */
async function prepare() {
  if (typeof WebAssembly !== "object" || typeof WebAssembly.instantiate !== "function") throw new Error(NO_WASM);
  show("Asking the inference service about its model…");
  const name = await listModel();
  state.info = await rpc("/encinfer.v1.Inference/GetModelInfo", requests.getModelInfo(name), modelInfo);
  state.layout = pickLayout(state.info, new URLSearchParams(location.hash.slice(1)).get("layout") || "");
  show("Making your keys in this page (the secret key never leaves it)…");
  const params = { ...state.layout.params };
  if (params.needsPublicKey) params.commonA = await commonA(params);
  let init;
  try {
    init = await call("init", { params, name: `${state.info.name}:${state.layout.layout.manifestSha256}` });
  } catch (e) {
    if (/WebAssembly|wasm|CompileError/i.test(e.message)) {
      throw new Error(`This browser cannot run SEAL's WebAssembly (${e.message}); it needs WebAssembly exception handling (Chrome 95+, Firefox 100+, Safari 15.2+).`);
    }
    throw e;
  }
  Object.assign(state.stats, { initMs: init.initMs, keygenMs: init.keygenMs, fresh: init.fresh, bundleBytes: init.bundleBytes });
  state.keyId = init.keyId;
  await ensureUploaded();
}

/** The service's common polynomial a for public keys (public data: the gateway computes it). */
async function commonA(p) {
  const response = await fetch(`common-a?n=${p.polyModulusDegree}&bits=${p.coeffModulusBits.join(",")}`);
  if (!response.ok) throw new Error(`the page's server cannot give the public keys' common polynomial (HTTP ${response.status}: ${await response.text()})`);
  return new BigUint64Array(await response.arrayBuffer());
}

async function ensureUploaded() {
  if (state.keyId) {
    try {
      const record = await rpc("/encinfer.v1.KeyStore/StatKeys", requests.statKeys(state.keyId), keyRecord);
      if (record.expires - Date.now() / 1000 > EXPIRY_MARGIN_SECONDS) return;
    } catch (e) {
      if (!(e instanceof RpcError && e.code === Code.NOT_FOUND)) throw e;
    }
  }
  show("Uploading your public keys to the key store…");
  const { bundle } = await call("bundle");
  const record = await rpc("/encinfer.v1.KeyStore/PutKeysUnary",
    requests.putKeysUnary(bundle, { model: state.info.name, from: "web" }), keyRecord);
  state.keyId = record.keyId;
  state.uploads += 1;
  state.stats.uploadedBytes = bundle.length;
  await call("setKeyId", { keyId: record.keyId });
}

async function predict(pixels, retried = false) {
  const t0 = performance.now();
  const { ciphertext, ms: encryptMs } = await call("encrypt", { values: state.layout.input(pixels) });
  show("Asking the inference service (it sees only ciphertext)…");
  const t1 = performance.now();
  let answer;
  try {
    answer = await rpc("/encinfer.v1.Inference/Predict",
      requests.predict(state.info.name, state.keyId, crypto.randomUUID(), ciphertext, state.layout.layoutNumber),
      predictResponse);
  } catch (e) {
    if (!retried && e instanceof RpcError && e.code === Code.NOT_FOUND && /key/i.test(e.message)) {
      show("Your keys expired on the key store; uploading them again…", "warn");
      state.keyId = "";
      await ensureUploaded();
      return predict(pixels, true);
    }
    throw e;
  }
  const roundTripMs = performance.now() - t1;
  if (answer.code) throw new RpcError(answer.code, answer.message, "/encinfer.v1.Inference/Predict");
  const { coefficients, ms: decryptMs } = state.layout.answer === "coeff"
    ? await call("decryptCoeff", { answer: answer.ciphertexts[0], layout: state.layout.answerLayout })
    : await call("decrypt", { ciphertexts: answer.ciphertexts });
  const values = state.layout.scores(coefficients);
  Object.assign(state.stats, {
    encryptMs, roundTripMs, decryptMs, serverMs: answer.serverMs, totalMs: performance.now() - t0,
    gatewayMs: state.lastTiming.gateway, upstreamMs: state.lastTiming.upstream, bridgeMs: state.lastTiming.bridge,
    ciphertextBytes: ciphertext.length, answerBytes: answer.ciphertexts.reduce((n, c) => n + c.length, 0),
  });
  return values;
}

// ---------------------------------------------------------------- drawing and MNIST preprocessing

function clearPad() {
  pad.fillStyle = "#000";
  pad.fillRect(0, 0, canvas.width, canvas.height);
}

let drawing = false, last = null;
function point(e) {
  const r = canvas.getBoundingClientRect();
  return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
}
canvas.addEventListener("pointerdown", (e) => { drawing = true; last = point(e); canvas.setPointerCapture(e.pointerId); stroke(e); });
canvas.addEventListener("pointermove", (e) => drawing && stroke(e));
canvas.addEventListener("pointerup", () => { drawing = false; last = null; });
function stroke(e) {
  const p = point(e);
  pad.strokeStyle = "#fff";
  pad.lineWidth = canvas.width / 12;
  pad.lineCap = pad.lineJoin = "round";
  pad.beginPath();
  pad.moveTo(...last);
  pad.lineTo(...p);
  pad.stroke();
  last = p;
}

/**
 * MNIST's preprocessing: grey levels; the digit's bounding box scaled (aspect kept) into a 20x20
 * box; placed in 28x28 so that its centre of mass is at the centre. Returns 784 values in [0, 1].
 */
export function preprocess(source) {
  const { width, height } = source;
  const data = source.getContext("2d").getImageData(0, 0, width, height).data;
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) {
    if (data[4 * (y * width + x)] > 0) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  }
  if (x1 < 0) return null;
  const w = x1 - x0 + 1, h = y1 - y0 + 1, s = 20 / Math.max(w, h);
  const bw = Math.max(1, Math.round(w * s)), bh = Math.max(1, Math.round(h * s));
  const box = new OffscreenCanvas(bw, bh).getContext("2d", { willReadFrequently: true });
  box.imageSmoothingEnabled = true;
  box.imageSmoothingQuality = "high";
  box.drawImage(source, x0, y0, w, h, 0, 0, bw, bh);
  const small = box.getImageData(0, 0, bw, bh).data;
  let mass = 0, mx = 0, my = 0;
  for (let y = 0; y < bh; y++) for (let x = 0; x < bw; x++) {
    const v = small[4 * (y * bw + x)];
    mass += v; mx += v * x; my += v * y;
  }
  const ox = Math.round(14 - (mass ? mx / mass : bw / 2 - 0.5) - 0.5);
  const oy = Math.round(14 - (mass ? my / mass : bh / 2 - 0.5) - 0.5);
  const pixels = new Float64Array(784);
  for (let y = 0; y < bh; y++) for (let x = 0; x < bw; x++) {
    const tx = x + ox, ty = y + oy;
    if (tx >= 0 && tx < 28 && ty >= 0 && ty < 28) pixels[ty * 28 + tx] = small[4 * (y * bw + x)] / 255;
  }
  return pixels;
}

function showPixels(pixels) {
  const view = $("seen").getContext("2d");
  const img = view.createImageData(28, 28);
  pixels.forEach((v, i) => { const g = Math.round(v * 255); img.data.set([g, g, g, 255], 4 * i); });
  view.putImageData(img, 0, 0);
}

// ---------------------------------------------------------------- results

function render(values) {
  const labels = state.info.classLabels.length ? state.info.classLabels : values.map((_, i) => String(i));
  const top = values.indexOf(Math.max(...values));
  const max = Math.max(...values), exp = values.map((v) => Math.exp(v - max)), sum = exp.reduce((a, b) => a + b, 0);
  $("digit").textContent = labels[top];
  $("bars").replaceChildren(...values.map((v, i) => {
    const bar = document.createElement("div");
    bar.className = `bar${i === top ? " top" : ""}`;
    bar.innerHTML = `<span class="fill"></span><span class="label"></span><span class="score"></span>`;
    bar.querySelector(".fill").style.height = `${Math.max(2, 100 * exp[i] / sum)}%`;
    bar.querySelector(".label").textContent = labels[i];
    bar.querySelector(".score").textContent = v.toFixed(2);
    bar.title = `score ${v.toFixed(4)}, softmax ${(exp[i] / sum).toFixed(3)}`;
    return bar;
  }));
  const s = state.stats, ms = (v) => (v === undefined ? "–" : `${v.toFixed(1)} ms`), kb = (v) => (v === undefined ? "–" : `${(v / 1024).toFixed(1)} KB`);
  const rows = [
    ["layout", `${state.layout.kind} (model ${state.info.name} ${state.info.version})`],
    ["SEAL start-up (WebAssembly)", ms(s.initMs)], [s.fresh ? "key generation" : "keys (loaded from this browser)", s.fresh ? ms(s.keygenMs) : "stored"],
    ["encrypt", ms(s.encryptMs)], ["round trip (as this page sees it)", ms(s.roundTripMs)], ["  at the gateway (of it: the services)", `${ms(s.gatewayMs)} (${ms(s.upstreamMs)})`],
    ["  server compute", ms(s.serverMs)],
    ["decrypt", ms(s.decryptMs)], ["public keys uploaded", s.uploadedBytes ? kb(s.uploadedBytes) : "none this time"],
    ["ciphertext up / answer down", `${kb(s.ciphertextBytes)} / ${kb(s.answerBytes)}`], ["all bytes up / down", `${kb(s.up)} / ${kb(s.down)}`],
  ];
  $("stats").replaceChildren(...rows.map(([k, v]) => { const tr = document.createElement("tr"); tr.innerHTML = "<th></th><td></td>"; tr.firstChild.textContent = k; tr.lastChild.textContent = v; return tr; }));
  $("result").hidden = false;
}

async function run(pixels) {
  $("go").disabled = true;
  state.busy = true;
  try {
    if (typeof WebAssembly !== "object") throw new Error(NO_WASM);
    if (!pixels) { show("Draw a digit first.", "warn"); return null; }
    state.pixels = pixels;
    showPixels(pixels);
    state.stats = { ...state.stats, up: 0, down: 0, uploadedBytes: 0 };
    if (!state.ready) state.ready = prepare();
    try { await state.ready; } catch (e) { state.ready = null; throw e; }
    const values = await predict(pixels);
    render(values);
    show(`Decrypted in this page: the service saw only ciphertext. Key id ${state.keyId.slice(0, 12)}…`, "ok");
    return values;
  } catch (e) {
    console.error(e);
    show(explain(e), "error");
    return null;
  } finally {
    $("go").disabled = false;
    state.busy = false;
  }
}

$("go").addEventListener("click", () => run(preprocess(canvas)));
$("clear").addEventListener("click", () => { clearPad(); $("result").hidden = true; show("Draw a digit (0–9) in the black square."); });
$("token").value = localStorage.getItem("encinfer-token") || new URLSearchParams(location.hash.slice(1)).get("token") || "";
$("token").addEventListener("change", () => localStorage.setItem("encinfer-token", token()));
if (typeof WebAssembly !== "object") show(NO_WASM, "error");
clearPad();

// For the browser tests (and the curious): draw a 28x28 image onto the pad, run, read the state.
window.encinfer = {
  drawPixels(pixels) {
    clearPad();
    const img = new ImageData(28, 28);
    pixels.forEach((v, i) => { const g = Math.round(v * 255); img.data.set([g, g, g, 255], 4 * i); });
    const small = new OffscreenCanvas(28, 28);
    small.getContext("2d").putImageData(img, 0, 0);
    pad.imageSmoothingEnabled = false;
    pad.drawImage(small, 0, 0, canvas.width, canvas.height);
  },
  run: () => run(preprocess(canvas)),
  state,
};

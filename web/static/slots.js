// CKKS slots <-> polynomial coefficients, in SEAL's slot order, for node-seal (which encodes only
// real slot vectors). With the exact coefficient codec (sealcoeff.js) this is a complex encoder:
// slot values -> coefficients (this file, floating point) -> plaintext (SEAL's own NTT).
//
// SEAL's CKKSEncoder (ckks.cpp) puts slot j at the root zeta^(3^j mod 2N), zeta = exp(i pi / N),
// and slot N/2 + j at its conjugate root. tests/test_web_node.py checks this order against
// node-seal's own real encoder and TenSEAL's complex one.

/** In-place iterative radix-2 FFT, sum_i a_i exp(sign * 2 pi i ik / n). */
function fft(re, im, sign) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) { [re[i], re[j]] = [re[j], re[i]]; [im[i], im[j]] = [im[j], im[i]]; }
  }
  for (let len = 2; len <= n; len <<= 1) {
    const ang = sign * 2 * Math.PI / len, wr = Math.cos(ang), wi = Math.sin(ang), half = len >> 1;
    for (let i = 0; i < n; i += len) {
      let cr = 1, ci = 0;
      for (let k = 0; k < half; k++) {
        const a = i + k, b = a + half;
        const xr = re[b] * cr - im[b] * ci, xi = re[b] * ci + im[b] * cr;
        re[b] = re[a] - xr; im[b] = im[a] - xi;
        re[a] += xr; im[a] += xi;
        const t = cr * wr - ci * wi; ci = cr * wi + ci * wr; cr = t;
      }
    }
  }
}

const orders = new Map();
/** The root exponent (odd, below 2N) of each of the N/2 slots. */
function slotRoots(n) {
  if (!orders.has(n)) {
    const m = 2 * n, out = new Int32Array(n / 2);
    for (let j = 0, pos = 1; j < n / 2; j++, pos = (pos * 3) % m) out[j] = pos;
    orders.set(n, out);
  }
  return orders.get(n);
}

/** The real coefficients (length N) of the polynomial whose slots are re + i*im (length N/2). */
export function slotsToCoefficients(re, im, n) {
  const m = 2 * n, roots = slotRoots(n);
  const vr = new Float64Array(m), vi = new Float64Array(m);
  for (let j = 0; j < n / 2; j++) {
    const k = roots[j], r = re[j] || 0, i = (im && im[j]) || 0;
    vr[k] = r; vi[k] = i;          // value at zeta^k
    vr[m - k] = r; vi[m - k] = -i; // and its conjugate at zeta^-k (real coefficients)
  }
  fft(vr, vi, -1); // a_t = (1/N) sum over odd k of v_k zeta^(-kt)
  const out = new Float64Array(n);
  for (let t = 0; t < n; t++) out[t] = vr[t] / n;
  return out;
}

/** The slot values { re, im } (length N/2) of the polynomial with real coefficients `coeffs`. */
export function coefficientsToSlots(coeffs, n) {
  const m = 2 * n, roots = slotRoots(n);
  const vr = new Float64Array(m), vi = new Float64Array(m);
  vr.set(coeffs.subarray ? coeffs.subarray(0, n) : coeffs.slice(0, n));
  fft(vr, vi, 1); // v_k = sum_t a_t zeta^(kt)
  const re = new Float64Array(n / 2), im = new Float64Array(n / 2);
  for (let j = 0; j < n / 2; j++) { re[j] = vr[roots[j]]; im[j] = vi[roots[j]]; }
  return { re, im };
}

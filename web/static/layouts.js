// Which of a model's layouts the page can produce, and how inputs and answers are laid out in
// them. The one place that knows the layouts: the worker only encrypts coefficient vectors and
// decrypts coefficient vectors (web/static/hekeys.js).
//
// node-seal has no complex CKKS encoder, but the page has an exact coefficient codec
// (sealcoeff.js), so it can put any polynomial in a plaintext:
//  - the coefficient layout (x(X) = sum_i x_i X^i, scores read at output coefficients) directly;
//  - the rotation-based latency layout (encinfer/he/latency.py) through slots.js, which turns
//    its (complex-packed) slot vector into coefficients in SEAL's slot order.
// The coefficient layout (LAYOUT_COEFF) is preferred: no Galois keys, the fastest and smallest.

import { coefficientsToSlots, slotsToCoefficients } from "./slots.js";

const nextPow2 = (n) => { let p = 1; while (p < n) p <<= 1; return p; };

export function isCoefficient(l) {
  return l.layout === "coeff";
}

function features(layout, pixels) {
  const lo = layout.inputMin, hi = layout.inputMax;
  const x = layout.featureIndices.length ? layout.featureIndices.map((i) => pixels[i]) : Array.from(pixels);
  if (hi > lo) for (const v of x) if (v < lo || v > hi) throw new Error(`an input value ${v} is outside [${lo}, ${hi}]`);
  return x;
}

function heParams(layout) {
  const p = layout.parameters;
  return { polyModulusDegree: p.polyModulusDegree, coeffModulusBits: p.coeffModulusBits,
    inputScaleBits: p.inputScaleBits, outputScaleBits: p.outputScaleBits, galoisSteps: p.galoisSteps,
    needsRelinKeys: p.needsRelinKeys, needsConjugationKey: p.needsConjugationKey, needsPublicKey: p.needsPublicKey };
}

/** The coefficient layout (encinfer/he/coeff.py): the features are the input's coefficients; the
 * answer is one "EIC1" message the worker decrypts itself (decryptCoeffAnswer). */
function coefficientAdapter(layout, info) {
  return {
    kind: "coefficient", layout, layoutNumber: 3, params: heParams(layout), answer: "coeff",
    answerLayout: { nOutputs: info.nOutputs, nFeatures: info.nFeatures, rowsPerProduct: layout.rowsPerProduct,
      answerBits: layout.answerBits },
    input: (pixels) => features(layout, pixels),
    scores: (values) => values,
  };
}

/** The rotation latency layout (latency.py): packed column ((s mod M) mod k) + k (s div M) in slot
 * s, M the outputs rounded up to a power of two, k = block_size M / S; score j in slot j. */
function rotationAdapter(layout, info) {
  const p = layout.parameters, n = p.polyModulusDegree, slots = n / 2;
  const m = nextPow2(info.nOutputs), k = layout.blockSize * m / slots;
  if (!Number.isInteger(k) || k < 1) throw new Error(`block_size ${layout.blockSize} does not fit the latency layout`);
  return {
    kind: p.complexPacking ? "rotation (complex packing)" : "rotation", layout, layoutNumber: 1,
    params: heParams(layout), answer: "ciphertext",
    input(pixels) {
      const x = features(layout, pixels);
      const packed = p.complexPacking ? Math.ceil(x.length / 2) : x.length;
      const re = new Float64Array(slots), im = new Float64Array(slots);
      for (let s = 0; s < slots; s++) {
        const c = ((s % m) % k) + k * Math.floor(s / m);
        if (c >= packed) continue;
        if (p.complexPacking) { re[s] = x[2 * c]; im[s] = 2 * c + 1 < x.length ? x[2 * c + 1] : 0; } else re[s] = x[c];
      }
      return slotsToCoefficients(re, im, n);
    },
    scores: (vectors) => {
      const { re } = coefficientsToSlots(Float64Array.from(vectors[0]), n);
      return layout.outputSlots.map((s) => re[s]);
    },
  };
}

/** The fastest layout of `info` this page can encrypt for, as an adapter ("latency" asks for the
 * rotation layout even where the coefficient layout is offered). */
export function pickLayout(info, wanted = "") {
  const latency = info.layouts.filter((l) => l.parameters && l.layout !== "batch");
  const coefficient = latency.find(isCoefficient);
  if (coefficient && wanted !== "latency") return coefficientAdapter(coefficient, info);
  const rotation = latency.find((l) => l.layout === "latency");
  if (rotation) return rotationAdapter(rotation, info);
  throw new Error(`model ${info.name} offers no layout this page can encrypt for (it offers: ` +
    `${info.layouts.map((l) => l.layout).join(", ") || "none"}); the page needs a latency or coefficient layout.`);
}

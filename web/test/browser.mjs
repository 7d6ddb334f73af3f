// Drives the page in headless Chromium (Debian's /usr/bin/chromium; nothing is downloaded) for
// tests/test_web_browser.py. One JSON command per stdin line, one JSON answer per stdout line.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const executablePath = process.env.ENCINFER_CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
const requests = [];
const consoleLines = [];
context.on("request", (r) => {
  const body = r.postDataBuffer();
  requests.push({ url: r.url(), method: r.method(), body: body ? body.toString("base64") : "" });
});
const page = await context.newPage();
page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));

const view = () => page.evaluate(() => {
  const s = window.encinfer.state;
  return { message: document.getElementById("message").textContent, messageKind: document.getElementById("message").className,
    keyId: s.keyId, uploads: s.uploads, stats: s.stats, layout: s.layout ? s.layout.kind : null, pixels: s.pixels ? Array.from(s.pixels) : null,
    digit: document.getElementById("digit").textContent };
});

const ops = {
  async open({ url }) { await page.goto(url); await page.waitForFunction(() => window.encinfer); return {}; },
  async reload() { await page.reload(); await page.waitForFunction(() => window.encinfer); return {}; },
  async predict({ pixels }) {
    const values = await page.evaluate(async (p) => { window.encinfer.drawPixels(p); return window.encinfer.run(); }, pixels);
    return { values, ...(await view()) };
  },
  async draw({ strokes }) {
    await page.click("#clear");
    const box = await page.locator("#pad").boundingBox();
    for (const stroke of strokes) {
      await page.mouse.move(box.x + stroke[0][0], box.y + stroke[0][1]);
      await page.mouse.down();
      for (const [x, y] of stroke.slice(1)) await page.mouse.move(box.x + x, box.y + y, { steps: 4 });
      await page.mouse.up();
    }
    await page.click("#go");
    await page.waitForFunction(() => !window.encinfer.state.busy, null, { timeout: 60000 });
    return await view();
  },
  async idb() {
    return { records: await page.evaluate(() => new Promise((resolve, reject) => {
      const req = indexedDB.open("encinfer", 1);
      req.onupgradeneeded = () => req.result.createObjectStore("keys");
      req.onerror = () => reject(req.error);
      req.onsuccess = () => {
        const all = req.result.transaction("keys").objectStore("keys").getAll();
        const b64 = (bytes) => { let s = ""; for (let i = 0; i < bytes.length; i += 8192) s += String.fromCharCode(...bytes.subarray(i, i + 8192)); return btoa(s); };
        all.onsuccess = () => resolve(all.result.map((r) => ({
          secretKey: b64(r.secretKey), bundleBytes: r.bundle.length, keyId: r.keyId })));
      };
    })) };
  },
  async isolated({ url, noWasm, pixels }) {
    // A fresh browser profile (no stored keys), optionally without WebAssembly.
    const other = await browser.newContext();
    if (noWasm) await other.addInitScript(() => { delete globalThis.WebAssembly; });
    const p = await other.newPage();
    await p.goto(url);
    await p.waitForFunction(() => window.encinfer);
    const { message, values, layout } = await p.evaluate(async (px) => {
      if (px) window.encinfer.drawPixels(px);
      const values = await window.encinfer.run();
      const s = window.encinfer.state;
      return { message: document.getElementById("message").textContent, values, layout: s.layout && s.layout.kind,
        pixels: s.pixels && Array.from(s.pixels) };
    }, pixels || null);
    const kind = await p.evaluate(() => document.getElementById("message").className);
    const seen = await p.evaluate(() => window.encinfer.state.pixels && Array.from(window.encinfer.state.pixels));
    await other.close();
    return { message, kind, values, layout, pixels: seen };
  },
  async screenshot({ path }) { await page.screenshot({ path, fullPage: true }); return {}; },
  async requests() { return { requests }; },
  async timing() {
    return { entries: await page.evaluate(() => performance.getEntriesByType("resource").filter((e) => e.name.includes("Predict")).map((e) => ({
      start: e.startTime, connect: e.connectEnd - e.connectStart, request: e.responseStart - e.requestStart, response: e.responseEnd - e.responseStart, total: e.duration, proto: e.nextHopProtocol }))) };
  },
  async console() { return { lines: consoleLines }; },
  async close() { await browser.close(); return {}; },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const command = JSON.parse(line);
  let answer;
  try {
    answer = { ok: true, ...(await ops[command.op](command)) };
  } catch (e) {
    answer = { ok: false, error: String(e && e.stack || e) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
  if (command.op === "close") break;
}
process.exit(0);

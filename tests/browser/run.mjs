#!/usr/bin/env node
// Headless browser test of magpie's web page against a real `magpie serve`.
//
//   node tests/browser/run.mjs --magpie PATH_TO_MAGPIE_BINARY [--photos DIR] [--out DIR] [--keep-temp]
//
// Starts the server on a copy of the photos with the tiny test models, drives the page in
// Chromium (playwright-core) through the data-testid hooks, saves a screenshot per step
// into the out dir (default target/browser) and exits 0 on success, 1 on any failure.
// See README.md beside this file.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const IMAGE_EXTS = new Set(['.jpg', '.jpeg', '.png', '.gif', '.webp', '.bmp', '.tif', '.tiff']);
const CLASSES = ['cat', 'rocket', 'coffee'];
const QUERY = 'a cat';
const QUESTION = 'what is in the picture?';
// Photos for which the tiny-a BLIP-2 fixture is known to answer that question with at
// least one token (tests/fixtures/blip2/README.md); used for the chat step when shown.
const CHAT_PREFERRED = ['rocket.jpg', 'chelsea.png', 'coffee.png', 'coffee_rgba.png'];
// The photo dropped on the page; it is indexed, so it must be its own nearest neighbour.
const DROP_PREFERRED = ['rocket.jpg', 'chelsea.png'];

const T = { health: 60_000, index: 300_000, ui: 30_000, chat: 120_000, label: 120_000 };

// ---------------------------------------------------------------- arguments

function usage(msg) {
  if (msg) console.error(`error: ${msg}`);
  console.error('usage: node tests/browser/run.mjs --magpie PATH_TO_MAGPIE_BINARY [--photos DIR] [--out DIR] [--keep-temp]');
  process.exit(1);
}

function parseArgs(argv) {
  const opts = { magpie: null, photos: null, out: path.join(REPO, 'target', 'browser'), keepTemp: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined || v.startsWith('--')) usage(`${a} needs a value`);
      return v;
    };
    if (a === '--magpie') opts.magpie = path.resolve(value());
    else if (a === '--photos') opts.photos = path.resolve(value());
    else if (a === '--out') opts.out = path.resolve(value());
    else if (a === '--keep-temp') opts.keepTemp = true;
    else if (a === '-h' || a === '--help') usage();
    else usage(`unknown argument ${a}`);
  }
  if (!opts.magpie) usage('--magpie is required');
  return opts;
}

// ---------------------------------------------------------------- helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

class TestFailure extends Error {}

function assert(cond, message) {
  if (!cond) throw new TestFailure(message);
}

/** Polls `fn` until it returns a truthy value; throws `describe(last)` after `timeout`. */
async function waitFor(fn, { timeout, interval = 250, describe }) {
  const deadline = Date.now() + timeout;
  let last;
  let lastError;
  for (;;) {
    try {
      last = await fn();
      lastError = undefined;
      if (last) return last;
    } catch (e) {
      if (e instanceof TestFailure) throw e;
      lastError = e;
    }
    if (Date.now() > deadline) {
      const why = describe(last);
      throw new TestFailure(lastError ? `${why} (last error: ${lastError.message})` : why);
    }
    await sleep(interval);
  }
}

function listImages(dir, rel = '') {
  const out = [];
  for (const entry of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
    const r = path.join(rel, entry.name);
    if (entry.isDirectory()) out.push(...listImages(dir, r));
    else if (entry.isFile() && IMAGE_EXTS.has(path.extname(entry.name).toLowerCase())) out.push(r);
  }
  return out.sort();
}

/** Copies the image files of `src` (recursively) into `dst`, writable; returns their relative paths. */
function copyPhotos(src, dst) {
  const files = listImages(src);
  for (const rel of files) {
    const to = path.join(dst, rel);
    fs.mkdirSync(path.dirname(to), { recursive: true });
    fs.copyFileSync(path.join(src, rel), to);
    fs.chmodSync(to, 0o644);
  }
  return files;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function findChromium() {
  const candidates = [process.env.CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'];
  for (const c of candidates) if (c && fs.existsSync(c)) return c;
  if (process.env.CHROMIUM) throw new Error(`CHROMIUM=${process.env.CHROMIUM} does not exist`);
  throw new Error('no Chromium found (set CHROMIUM, or install /usr/bin/chromium: apt-get install chromium)');
}

function tail(text, max = 20_000) {
  return text.length > max ? `…(${text.length - max} characters cut)…\n${text.slice(-max)}` : text;
}

// ---------------------------------------------------------------- the run

const opts = parseArgs(process.argv.slice(2));
if (!fs.existsSync(opts.magpie)) usage(`no magpie binary at ${opts.magpie}`);

let photosSrc = opts.photos;
if (!photosSrc) {
  photosSrc = path.resolve(REPO, '..', 'shared', 'data', 'photos');
  if (!fs.existsSync(photosSrc)) photosSrc = path.join(REPO, 'tests', 'fixtures', 'photos');
}
if (!fs.existsSync(photosSrc)) usage(`no photos folder at ${photosSrc}`);

fs.mkdirSync(opts.out, { recursive: true });
for (const f of fs.readdirSync(opts.out)) {
  if (/^\d\d-.*\.png$/.test(f) || f === 'server.log' || f === 'browser-console.log') fs.rmSync(path.join(opts.out, f), { force: true });
}
const serverLogPath = path.join(opts.out, 'server.log');
const consoleLogPath = path.join(opts.out, 'browser-console.log');

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'magpie-browser-'));
const dataDir = path.join(tmp, 'data');
const photosDir = path.join(tmp, 'photos');
fs.mkdirSync(dataDir);
fs.mkdirSync(photosDir);

let server = null;
let serverExit = null;
let browser = null;
let cleanedUp = false;
const consoleLines = [];
const pageErrors = [];
const serverErrors = [];
let passed = 0;
let failed = 0;

async function stopServer() {
  if (!server || serverExit) return;
  const exited = new Promise((r) => server.once('exit', r));
  server.kill('SIGTERM');
  const timer = setTimeout(() => server.kill('SIGKILL'), 5_000);
  await exited;
  clearTimeout(timer);
}

async function cleanup() {
  if (cleanedUp) return;
  cleanedUp = true;
  if (browser) await browser.close().catch(() => {});
  await stopServer().catch(() => {});
  fs.writeFileSync(consoleLogPath, consoleLines.join('\n') + '\n');
  if (opts.keepTemp) console.log(`temp dir kept: ${tmp}`);
  else fs.rmSync(tmp, { recursive: true, force: true });
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    console.error(`\n${sig}: stopping`);
    cleanup().finally(() => process.exit(1));
  });
}

async function main() {
  const images = copyPhotos(photosSrc, photosDir);
  const N = images.length;
  assert(N > 0, `no image files (${[...IMAGE_EXTS].join(' ')}) in ${photosSrc}`);
  console.log(`photos: ${N} images from ${photosSrc} copied to ${photosDir}`);

  // ------------------------------------------------------------ server
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const args = [
    '--data-dir', dataDir,
    '--model', path.join(REPO, 'tests/fixtures/clip/tiny-a'),
    '--caption-model', path.join(REPO, 'tests/fixtures/blip2/tiny-a'),
    '--device', 'cpu',
    'serve', '--bind', `127.0.0.1:${port}`, '--root', photosDir,
  ];
  console.log(`server: ${opts.magpie} ${args.join(' ')}`);
  const logFd = fs.openSync(serverLogPath, 'w');
  server = spawn(opts.magpie, args, {
    cwd: REPO,
    stdio: ['ignore', logFd, logFd],
    env: { ...process.env, HF_HUB_OFFLINE: '1', RUST_BACKTRACE: '1' },
  });
  fs.closeSync(logFd);
  server.on('exit', (code, signal) => { serverExit = { code, signal }; });
  server.on('error', (e) => { serverExit = { code: null, signal: null, error: e.message }; });

  await waitFor(async () => {
    if (serverExit) throw new TestFailure(`magpie exited before answering /api/health: ${JSON.stringify(serverExit)}`);
    const r = await fetch(`${base}/api/health`);
    return r.ok && (await r.json()).ok === true;
  }, { timeout: T.health, describe: () => `GET /api/health did not answer {"ok": true} within ${T.health / 1000} s` });
  console.log(`server: up at ${base}`);

  async function api(p, init) {
    const r = await fetch(base + p, init);
    const text = await r.text();
    let body;
    try { body = JSON.parse(text); } catch { body = text; }
    if (!r.ok) throw new TestFailure(`${init?.method ?? 'GET'} ${p} -> ${r.status} ${text.slice(0, 500)}`);
    return body;
  }

  // ------------------------------------------------------------ browser
  const executablePath = findChromium();
  // The extra flags keep Chromium from reaching for the network at start (a closed
  // network refuses those connections, many at a time).
  browser = await chromium.launch({
    executablePath,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(T.ui);
  page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => { pageErrors.push(e.message); consoleLines.push(`[pageerror] ${e.message}`); });
  page.on('response', (r) => {
    if (r.status() >= 500 && new URL(r.url()).pathname.startsWith('/api/')) {
      serverErrors.push(`${r.request().method()} ${r.url()} -> ${r.status()}`);
    }
  });

  const tid = (id) => `[data-testid="${id}"]`;
  const gridCards = page.locator(`${tid('result-grid')} ${tid('result-card')}`);
  const cardIds = () => gridCards.evaluateAll((els) => els.map((e) => e.getAttribute('data-id')));

  let stepNo = 0;
  async function step(name, fn) {
    stepNo += 1;
    const tag = `${String(stepNo).padStart(2, '0')}-${name}`;
    const started = Date.now();
    try {
      await fn();
      await page.screenshot({ path: path.join(opts.out, `${tag}.png`), fullPage: true });
      passed += 1;
      console.log(`ok   ${tag} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
    } catch (e) {
      failed += 1;
      await page.screenshot({ path: path.join(opts.out, `${tag}-FAILED.png`), fullPage: true }).catch(() => {});
      console.error(`FAIL ${tag}: ${e.message}`);
      e.reported = true;
      throw e;
    }
  }

  // id -> path, from the API (a vector search returns every image when k >= their number).
  let pathById = new Map();
  const idOf = (basename) => [...pathById].find(([, p]) => path.basename(p) === basename)?.[0];

  await step('open', async () => {
    const r = await page.goto(`${base}/`);
    assert(r && r.ok(), `GET / answered ${r && r.status()}`);
    for (const id of ['search-input', 'status-bar', 'index-button']) {
      await page.locator(tid(id)).waitFor({ state: 'visible' })
        .catch(() => { throw new TestFailure(`${tid(id)} is not visible on the page`); });
    }
  });

  await step('index', async () => {
    await page.locator(tid('index-button')).click();
    let sawRunning = false;
    let sawProgress = false;
    const status = await waitFor(async () => {
      const s = await api('/api/status');
      const jobs = Array.isArray(s.jobs) ? s.jobs : [];
      const failedJob = jobs.find((j) => j.kind === 'index' && (j.state === 'failed' || j.state === 'cancelled'));
      if (failedJob) throw new TestFailure(`index job ${failedJob.state}: ${failedJob.error ?? ''} ${JSON.stringify(failedJob)}`);
      const running = jobs.some((j) => j.state === 'running');
      sawRunning ||= running;
      if (!sawProgress) sawProgress = await page.locator(tid('job-progress')).isVisible().catch(() => false);
      if (!running && s.images?.indexed === N) return s;
      if (sawRunning && !running && s.images?.indexed !== N) {
        throw new TestFailure(`index job finished with ${s.images?.indexed} indexed, expected ${N}: ${JSON.stringify(s.images)}`);
      }
      return null;
    }, { timeout: T.index, interval: 500, describe: () => `status did not reach ${N} indexed images with no running job within ${T.index / 1000} s` });
    console.log(`     indexed ${status.images.indexed}, failed ${status.images.failed}; job-progress seen: ${sawProgress}`);
    const countRe = new RegExp(`(^|\\D)${N}(\\D|$)`);
    await waitFor(async () => countRe.test(await page.locator(tid('status-bar')).innerText()), {
      timeout: T.ui,
      describe: () => `status-bar does not show the indexed count ${N}`,
    }).catch(async (e) => {
      throw new TestFailure(`${e.message}; it shows: ${JSON.stringify(await page.locator(tid('status-bar')).innerText())}`);
    });
    const all = await api(`/api/search?q=${encodeURIComponent('a photo')}&mode=vector&k=200`);
    pathById = new Map(all.hits.map((h) => [String(h.id), h.path]));
    assert(pathById.size === N, `a vector search with k=200 returned ${pathById.size} images, expected all ${N}`);
  });

  let openedId = null;

  await step('search', async () => {
    await page.locator(tid('search-input')).fill(QUERY);
    await page.locator(tid('search-input')).press('Enter');
    await waitFor(async () => (await gridCards.count()) >= 1, {
      timeout: T.ui, describe: () => `no ${tid('result-card')} in ${tid('result-grid')} after searching "${QUERY}"`,
    });
    const ids = await cardIds();
    assert(ids.every((id) => pathById.has(id)), `result cards with unknown data-id: ${JSON.stringify(ids)}`);
    assert(new Set(ids).size === ids.length, `duplicate result cards: ${JSON.stringify(ids)}`);
    // The page's first card must be the API's best hit for the same query and mode.
    const modeSel = page.locator(tid('mode-select'));
    let mode = 'hybrid';
    if ((await modeSel.count()) > 0 && (await modeSel.evaluate((e) => e.tagName)) === 'SELECT') mode = await modeSel.inputValue();
    assert(['vector', 'text', 'hybrid'].includes(mode), `mode-select value ${JSON.stringify(mode)} is not vector, text or hybrid`);
    const ref = await api(`/api/search?q=${encodeURIComponent(QUERY)}&mode=${mode}`);
    assert(ref.hits.length > 0 && String(ref.hits[0].id) === ids[0],
      `first card is id ${ids[0]}, but GET /api/search (mode ${mode}) ranks id ${ref.hits[0]?.id} first`);
  });

  async function openCard(id) {
    const card = id == null ? gridCards.first() : page.locator(`${tid('result-grid')} ${tid('result-card')}[data-id="${id}"]`).first();
    const cardId = await card.getAttribute('data-id');
    await card.click();
    await page.locator(tid('image-view')).waitFor({ state: 'visible' })
      .catch(() => { throw new TestFailure(`${tid('image-view')} did not become visible after clicking card ${cardId}`); });
    assert((await page.locator(`${tid('image-view')} ${tid('image-caption')}`).count()) > 0,
      `${tid('image-caption')} missing in the image view`);
    // The view must show this image, through the API (thumbnail or original), loaded.
    await waitFor(() => page.locator(tid('image-view')).evaluate((v, id) =>
      [...v.querySelectorAll('img')].some((img) => img.src.includes(`/api/images/${id}/`) && img.complete && img.naturalWidth > 0), cardId),
    { timeout: T.ui, describe: () => `the image view shows no loaded <img> from /api/images/${cardId}/` });
    return cardId;
  }

  async function closeViewIfOpen() {
    if (await page.locator(tid('image-view')).isVisible()) {
      await page.locator(tid('close-view')).click();
      await page.locator(tid('image-view')).waitFor({ state: 'hidden' })
        .catch(() => { throw new TestFailure(`${tid('image-view')} still visible after clicking ${tid('close-view')}`); });
    }
  }

  await step('open-result', async () => {
    openedId = await openCard(null);
  });

  await step('more-like-this', async () => {
    const before = await cardIds();
    await page.locator(tid('more-like-this')).click();
    const ids = await waitFor(async () => {
      const now = await cardIds();
      return now.length > 0 && !now.includes(openedId) && now.join() !== before.join() ? now : null;
    }, { timeout: T.ui, describe: () => `result cards did not change to images like ${openedId} (without it) after ${tid('more-like-this')}` });
    const ref = await api(`/api/images/${openedId}/similar`);
    assert(String(ref.hits[0]?.id) === ids[0],
      `first similar card is id ${ids[0]}, but GET /api/images/${openedId}/similar ranks id ${ref.hits[0]?.id} first`);
  });

  let chatId = null;

  await step('chat', async () => {
    await closeViewIfOpen();
    const shown = await cardIds();
    const preferred = CHAT_PREFERRED.map(idOf).find((id) => id && shown.includes(id));
    chatId = await openCard(preferred ?? null);
    await page.locator(tid('chat-input')).fill(QUESTION);
    await page.locator(tid('chat-send')).click();
    const answer = page.locator(`${tid('chat-answer')}[data-done="true"]`).last();
    await answer.waitFor({ state: 'attached', timeout: T.chat })
      .catch(() => { throw new TestFailure(`no ${tid('chat-answer')} with data-done="true" within ${T.chat / 1000} s`); });
    const text = (await answer.innerText()).trim();
    assert(text.length > 0, `the chat answer about image ${chatId} (${pathById.get(chatId)}) is empty`);
    const convs = await api(`/api/conversations?image_id=${chatId}`);
    assert(Array.isArray(convs) && convs.length > 0, `GET /api/conversations?image_id=${chatId} lists no conversation`);
    const conv = await api(`/api/conversations/${convs[0].id}`);
    const roles = (conv.messages ?? []).map((m) => m.role);
    assert(conv.messages?.some((m) => m.role === 'user' && m.text.trim() === QUESTION) && roles.includes('assistant'),
      `conversation ${convs[0].id} does not hold the question and an answer: ${JSON.stringify(conv.messages)}`);
    console.log(`     answer about ${path.basename(pathById.get(chatId) ?? '?')}: ${JSON.stringify(text.slice(0, 120))}`);
  });

  await step('close-view', async () => {
    await page.locator(tid('close-view')).click();
    await page.locator(tid('image-view')).waitFor({ state: 'hidden' })
      .catch(() => { throw new TestFailure(`${tid('image-view')} still visible after clicking ${tid('close-view')}`); });
  });

  await step('image-search', async () => {
    const name = DROP_PREFERRED.find((n) => idOf(n)) ?? path.basename(images[0]);
    const file = path.join(photosDir, images.find((rel) => path.basename(rel) === name));
    const expected = idOf(name);
    assert(expected, `no indexed image named ${name}`);
    await page.locator(tid('drop-input')).setInputFiles(file);
    await waitFor(async () => (await cardIds())[0] === expected, {
      timeout: T.ui,
      describe: () => `after dropping ${name} (id ${expected}) the first result card is not that image`,
    }).catch(async (e) => {
      const ids = await cardIds();
      throw new TestFailure(`${e.message}; cards: ${JSON.stringify(ids.slice(0, 5).map((id) => `${id}=${path.basename(pathById.get(id) ?? '?')}`))}`);
    });
  });

  await step('labels', async () => {
    const shown = await cardIds();
    assert(shown.length > 0, 'no result cards shown before labelling');
    await page.locator(tid('label-tab')).click();
    await page.locator(tid('label-classes')).fill(CLASSES.join(', '));
    await page.locator(tid('label-run')).click();
    const groups = page.locator(tid('label-group'));
    const read = () => groups.evaluateAll((els) => els.map((g) => {
      let cards = g.querySelectorAll('[data-testid="result-card"]');
      if (cards.length === 0) cards = g.querySelectorAll('[data-id]');
      return { label: g.getAttribute('data-label'), ids: [...cards].map((c) => c.getAttribute('data-id')) };
    }));
    const result = await waitFor(async () => {
      const gs = await read();
      return gs.length > 0 && gs.reduce((n, g) => n + g.ids.length, 0) === shown.length ? gs : null;
    }, { timeout: T.label, describe: () => `label groups did not hold the ${shown.length} shown results` })
      .catch(async (e) => { throw new TestFailure(`${e.message}; groups: ${JSON.stringify(await read())}`); });
    const labels = result.map((g) => g.label);
    assert(labels.every((l) => CLASSES.includes(l)), `label-group data-label values ${JSON.stringify(labels)} are not all in ${JSON.stringify(CLASSES)}`);
    assert(new Set(labels).size === labels.length, `a class has more than one label-group: ${JSON.stringify(labels)}`);
    const grouped = result.flatMap((g) => g.ids);
    if (grouped.every((id) => id != null)) {
      assert(new Set(grouped).size === grouped.length && grouped.every((id) => shown.includes(id)),
        `grouped cards ${JSON.stringify(grouped)} are not the shown results ${JSON.stringify(shown)}`);
    }
    console.log(`     ${result.map((g) => `${g.label}: ${g.ids.length}`).join(', ')}`);
  });

  await step('phone', async () => {
    await page.setViewportSize({ width: 375, height: 812 });
    await sleep(300);
    const { scrollWidth, innerWidth } = await page.evaluate(() => ({
      scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
    }));
    assert(scrollWidth <= innerWidth + 1, `the page scrolls sideways on a 375 px wide phone (scrollWidth ${scrollWidth})`);
  });

  await step('no-errors', async () => {
    assert(pageErrors.length === 0, `uncaught errors in the page: ${JSON.stringify(pageErrors)}`);
    assert(serverErrors.length === 0, `5xx answers to the page: ${JSON.stringify(serverErrors)}`);
  });
}

let ok = false;
try {
  await main();
  ok = true;
} catch (e) {
  if (!e?.reported) {
    failed += 1;
    console.error(`FAIL: ${e instanceof TestFailure ? e.message : e.stack ?? e}`);
  }
} finally {
  await cleanup();
}

if (!ok) {
  const log = fs.existsSync(serverLogPath) ? fs.readFileSync(serverLogPath, 'utf8') : '(no server log)';
  console.error(`\n----- server log (${serverLogPath}) -----\n${tail(log)}\n----- end of server log -----`);
  if (consoleLines.length) console.error(`----- browser console (${consoleLogPath}) -----\n${tail(consoleLines.join('\n'), 10_000)}`);
  console.error(`screenshots: ${opts.out}`);
}
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(ok ? 0 : 1);

// magpie web page. Talks only to the HTTP API described in crates/server/API.md.
// Plain ES module, no framework, no build step. All data goes into the page through
// textContent / attributes, never through innerHTML.

const PAGE_SIZE = 48;          // `k` for every search page (API allows 1..=200)
const DEBOUNCE_MS = 250;       // live search delay
const TOKEN_KEY = 'magpie.token';
const POLL_RUNNING_MS = 2000;  // status poll while a job runs
const POLL_IDLE_MS = 10000;    // status poll otherwise
const POLL_HIDDEN_MS = 30000;  // status poll while the tab is in the background
const FINISHED_JOB_MS = 30000; // how long a finished job stays in the status bar

/* ------------------------------------------------------------------ DOM helpers */

const $ = (id) => document.getElementById(id);

const els = {
  form: $('search-form'), q: $('q'), mode: $('mode'), negative: $('negative'),
  dropInput: $('drop-input'), filtersToggle: $('filters-toggle'), filterCount: $('filter-count'),
  labelTab: $('label-tab'),
  filters: $('filters'), filtersClose: $('filters-close'), filtersClear: $('filters-clear'),
  filtersDone: $('filters-done'), rootList: $('root-list'),
  fFolder: $('f-folder'), fFrom: $('f-from'), fTo: $('f-to'), fCamera: $('f-camera'),
  fType: $('f-type'), fLabel: $('f-label'), fMinScore: $('f-min-score'), fSort: $('f-sort'),
  queryBar: $('query-bar'),
  meta: $('result-meta'), searchError: $('search-error'), searchErrorText: $('search-error-text'),
  searchRetry: $('search-retry'), empty: $('empty'), emptyTitle: $('empty-title'),
  emptyText: $('empty-text'), grid: $('grid'), sentinel: $('sentinel'), loading: $('loading'),
  statusDot: $('status-dot'), statusCounts: $('status-counts'), jobs: $('jobs'),
  tokenButton: $('token-button'), indexButton: $('index-button'), captionAll: $('caption-all'),
  labelView: $('label-view'), labelClose: $('label-close'), labelForm: $('label-form'),
  labelClasses: $('label-classes'), labelChips: $('label-chips'), labelTemplate: $('label-template'),
  labelStore: $('label-store'), labelRun: $('label-run'), labelAll: $('label-all'),
  labelMsg: $('label-msg'), labelResults: $('label-results'), labelSets: $('label-sets'),
  view: $('image-view'), viewTitle: $('iv-title'), closeView: $('close-view'), viewBody: $('iv-body'),
  viewLow: $('iv-low'), viewImg: $('iv-img'), viewError: $('iv-error'),
  caption: $('iv-caption'), captionModel: $('iv-caption-model'), captionNow: $('caption-now'),
  moreLikeThis: $('more-like-this'), originalBtn: $('iv-original-btn'),
  viewLabels: $('iv-labels'), exif: $('iv-exif'),
  chatNew: $('chat-new'), convList: $('conv-list'), chatLog: $('chat-log'), chatForm: $('chat-form'),
  chatInput: $('chat-input'), chatSend: $('chat-send'),
  dropOverlay: $('drop-overlay'), toasts: $('toasts'),
  tokenDialog: $('token-dialog'), tokenForm: $('token-form'), tokenMsg: $('token-msg'),
  tokenInput: $('token-input'),
};

/**
 * Creates an element. `props`: `class`, `text`, `on<event>` handlers, anything else is
 * set as an attribute (null/false skipped, true → empty attribute). Children may be
 * nodes or strings (strings become text nodes, so they are never parsed as HTML).
 */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = value;
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/** An icon from the sprite in index.html. */
function icon(name) {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('class', 'icon');
  svg.setAttribute('aria-hidden', 'true');
  const use = document.createElementNS(SVG_NS, 'use');
  use.setAttribute('href', `#i-${name}`);
  svg.append(use);
  return svg;
}

function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

/* ------------------------------------------------------------------ formatting */

const numberFormat = new Intl.NumberFormat();
const fmtNum = (n) => (typeof n === 'number' && Number.isFinite(n) ? numberFormat.format(n) : '–');

/** Scores come in very different ranges (cosine ~0.3, BM25 ~10, RRF ~0.03). */
function fmtScore(score) {
  if (typeof score !== 'number' || !Number.isFinite(score)) return '';
  const a = Math.abs(score);
  return a >= 10 ? score.toFixed(1) : a >= 1 ? score.toFixed(2) : score.toFixed(3);
}

function fmtBytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

function fmtDuration(seconds) {
  if (typeof seconds !== 'number' || !Number.isFinite(seconds) || seconds < 0) return '';
  const s = Math.round(seconds);
  const hours = Math.floor(s / 3600), minutes = Math.floor((s % 3600) / 60), secs = s % 60;
  if (hours) return `${hours}h ${minutes}m`;
  if (minutes) return `${minutes}m ${secs}s`;
  return `${secs}s`;
}

/** Accepts ISO strings (with or without zone) and Unix seconds/milliseconds. */
function fmtDate(value) {
  if (value == null || value === '') return '';
  let date;
  if (typeof value === 'number') date = new Date(value < 1e12 ? value * 1000 : value);
  else date = new Date(String(value));
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

function basename(path) {
  const s = String(path ?? '');
  return s.split(/[\\/]/).filter(Boolean).pop() || s;
}

const pct = (p) => (typeof p === 'number' ? `${Math.round(p * 100)}%` : '');

/* ------------------------------------------------------------------ token & API */

let memoryToken = ''; // fallback when sessionStorage is unavailable

function getToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || memoryToken; } catch { return memoryToken; }
}

function setToken(value) {
  memoryToken = value;
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* private mode: keep it in memory only */ }
}

/** `/?token=…` → sessionStorage, then drop it from the address bar and history. */
function readTokenFromUrl() {
  const url = new URL(location.href);
  if (!url.searchParams.has('token')) return;
  const value = url.searchParams.get('token');
  if (value) setToken(value);
  url.searchParams.delete('token');
  history.replaceState(history.state, '', url.pathname + url.search + url.hash);
}

/**
 * A URL for places that cannot send headers (<img src>, links, streams): adds
 * `token=` when a token is set. Only http(s) URLs are allowed through.
 */
function withToken(path) {
  const url = new URL(path, location.origin);
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return '#';
  const token = getToken();
  if (token) url.searchParams.set('token', token);
  return url.origin === location.origin ? url.pathname + url.search + url.hash : url.href;
}

/** Path plus query string; empty values are left out. */
function apiUrl(path, query = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, String(value));
  }
  return url.pathname + url.search;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

function authHeaders(extra = {}) {
  const headers = new Headers(extra);
  const token = getToken();
  if (token) headers.set('Authorization', `Bearer ${token}`);
  return headers;
}

/** Turns a non-2xx response into an ApiError using the `{"error": {code, message}}` body. */
async function errorFrom(res) {
  let code = `http_${res.status}`;
  let message = `Request failed (${res.status}${res.statusText ? ` ${res.statusText}` : ''})`;
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch { /* not JSON */ }
  if (res.status === 401) onUnauthorized();
  return new ApiError(res.status, code, message);
}

async function api(path, { method = 'GET', query, json, body, signal } = {}) {
  const headers = authHeaders({ Accept: 'application/json' });
  if (json !== undefined) {
    headers.set('Content-Type', 'application/json');
    body = JSON.stringify(json);
  }
  let res;
  try {
    res = await fetch(apiUrl(path, query), { method, headers, body, signal });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, 'network', 'Cannot reach the magpie server.');
  }
  if (!res.ok) throw await errorFrom(res);
  if (res.status === 204) return null;
  const type = res.headers.get('Content-Type') || '';
  return type.includes('json') ? res.json() : res.text();
}

const isAbort = (err) => err && err.name === 'AbortError';

/* ------------------------------------------------------------------ token prompt */

let tokenPromptShown = false; // open the prompt by itself only once per token

function onUnauthorized() {
  els.tokenButton.hidden = false;
  if (!tokenPromptShown) {
    tokenPromptShown = true;
    openTokenDialog();
  }
}

function openTokenDialog() {
  if (els.tokenDialog.open) return;
  els.tokenMsg.textContent = getToken()
    ? 'The server rejected the token. Enter the right one.'
    : 'This server requires an access token.';
  els.tokenInput.value = '';
  els.tokenDialog.showModal();
  els.tokenInput.focus();
}

function onTokenSubmit(event) {
  // With method="dialog" the dialog closes by itself; we only act on "Save".
  if (event.submitter && event.submitter.value === 'cancel') return;
  const value = els.tokenInput.value.trim();
  if (!value) return;
  setToken(value);
  tokenPromptShown = false;
  els.tokenButton.hidden = true;
  onTokenChanged();
}

/** Re-does what failed for lack of a token. */
function onTokenChanged() {
  pollStatus();
  loadLabelSets();
  if (search.kind) startSearch();
  if (!els.view.hidden && view.id != null) openImage(view.id, view.hit);
}

/* ------------------------------------------------------------------ toasts */

function toast(message, kind = 'info', ms = 6000) {
  const el = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    h('span', { class: 'toast-text' }, message),
    h('button', { type: 'button', class: 'icon-btn small', 'aria-label': 'Dismiss', onclick: () => el.remove() }, icon('x')));
  els.toasts.append(el);
  setTimeout(() => el.remove(), ms);
}

/* ------------------------------------------------------------------ search */

/**
 * The current query: `kind` is 'text' (the search box), 'image' (a dropped/picked
 * file, re-posted for every page) or 'similar' (an indexed image), or null (nothing).
 */
const search = {
  kind: null,
  q: '',
  file: null,
  fileUrl: null,        // object URL for the query chip
  similar: null,        // {id, hit}
  hits: [],             // everything shown in the grid, in order
  ids: new Set(),
  cursor: null,
  loading: false,
  failed: false,
  seq: 0,               // bumps on every new query so late answers are dropped
  abort: null,
};

function filterParams() {
  const v = (input) => input.value.trim();
  return {
    folder: v(els.fFolder), from: v(els.fFrom), to: v(els.fTo), camera: v(els.fCamera),
    type: v(els.fType), label: v(els.fLabel), min_score: v(els.fMinScore),
  };
}

function activeFilterCount() {
  return Object.values(filterParams()).filter(Boolean).length + (els.fSort.value !== 'relevance' ? 1 : 0);
}

function updateFilterBadge() {
  const n = activeFilterCount();
  els.filterCount.hidden = n === 0;
  els.filterCount.textContent = String(n);
}

/** One page of the current query. */
function fetchPage(cursor, signal) {
  const common = { k: PAGE_SIZE, cursor, ...filterParams() };
  if (search.kind === 'image') {
    const form = new FormData();
    form.append('image', search.file, search.file.name || 'image');
    return api('/api/search/image', { method: 'POST', query: common, body: form, signal });
  }
  if (search.kind === 'similar') {
    return api(`/api/images/${encodeURIComponent(search.similar.id)}/similar`, { query: common, signal });
  }
  const mode = els.mode.value;
  return api('/api/search', {
    query: {
      q: search.q, mode,
      negative: mode === 'text' ? '' : els.negative.value.trim(), // vector part only
      sort: els.fSort.value === 'date' ? 'date' : '',
      ...common,
    },
    signal,
  });
}

/** Starts the current query from its first page. */
function startSearch() {
  scheduleSearch.cancel();
  search.seq++;
  if (search.abort) search.abort.abort();
  search.cursor = null;
  search.failed = false;
  hideSearchError();
  if (!search.kind) {
    search.hits = [];
    search.ids.clear();
    els.grid.replaceChildren();
    els.grid.classList.remove('stale');
    search.loading = false;
    setLoading(false);
    renderResultState();
    return;
  }
  // Keep the old results (dimmed) until the new ones arrive: less flicker while typing.
  els.grid.classList.add('stale');
  loadPage(true);
}

const scheduleSearch = debounce(startSearch, DEBOUNCE_MS);

async function loadPage(first) {
  const seq = search.seq;
  const controller = new AbortController();
  search.abort = controller;
  search.loading = true;
  search.failed = false;
  setLoading(true);
  hideSearchError();
  try {
    const page = await fetchPage(first ? null : search.cursor, controller.signal);
    if (seq !== search.seq) return;
    if (first) {
      search.hits = [];
      search.ids.clear();
      els.grid.replaceChildren();
      els.grid.classList.remove('stale');
    }
    const hits = (Array.isArray(page?.hits) ? page.hits : []).filter((hit) => !search.ids.has(hit.id));
    for (const hit of hits) search.ids.add(hit.id);
    search.hits.push(...hits);
    search.cursor = page?.next_cursor || null;
    els.grid.append(...hits.map(renderCard));
  } catch (err) {
    if (seq !== search.seq || isAbort(err)) return;
    search.failed = true;
    if (first) {
      search.hits = [];
      search.ids.clear();
      els.grid.replaceChildren();
      els.grid.classList.remove('stale');
    }
    showSearchError(err.message);
  } finally {
    if (seq === search.seq) {
      search.loading = false;
      setLoading(false);
      renderResultState();
      // The sentinel does not fire again if it never left the viewport.
      if (!search.failed) requestAnimationFrame(maybeLoadMore);
    }
  }
}

function maybeLoadMore() {
  if (search.loading || search.failed || !search.cursor || !search.kind) return;
  const rect = els.sentinel.getBoundingClientRect();
  if (rect.top < window.innerHeight + 800) loadPage(false);
}

function setLoading(on) {
  els.loading.hidden = !on;
  els.grid.setAttribute('aria-busy', on ? 'true' : 'false');
}

function showSearchError(message) {
  els.searchErrorText.textContent = message;
  els.searchError.hidden = false;
}

function hideSearchError() {
  els.searchError.hidden = true;
}

function retrySearch() {
  if (search.hits.length) loadPage(false);
  else startSearch();
}

/** Header line, empty state. */
function renderResultState() {
  const n = search.hits.length;
  const more = search.cursor ? '+' : '';
  let meta = '';
  if (search.kind && n) {
    const count = `${fmtNum(n)}${more} result${n === 1 && !more ? '' : 's'}`;
    if (search.kind === 'text') meta = `${count} for “${search.q}”`;
    else if (search.kind === 'image') meta = `${count} like ${search.file?.name ? `“${search.file.name}”` : 'your image'}`;
    else meta = `${count} like “${basename(search.similar.hit?.path) || `#${search.similar.id}`}”`;
  }
  els.meta.textContent = meta;

  const showEmpty = n === 0 && !search.loading && els.searchError.hidden;
  els.empty.hidden = !showEmpty;
  if (!showEmpty) return;
  if (!search.kind) {
    els.emptyTitle.textContent = 'Find any photo';
    els.emptyText.textContent = 'Describe what you are looking for, or drop an image anywhere on the page.';
  } else {
    els.emptyTitle.textContent = 'No matches';
    els.emptyText.textContent = activeFilterCount()
      ? 'Nothing matches with these filters. Try loosening them.'
      : 'Try other words, another mode, or index more folders.';
  }
}

function thumbUrl(id, size) {
  return `/api/images/${encodeURIComponent(id)}/thumbnail${size ? `?size=${size}` : ''}`;
}

function renderCard(hit) {
  const name = basename(hit.path);
  const img = h('img', {
    src: withToken(hit.thumbnail || thumbUrl(hit.id)),
    alt: hit.caption || name, loading: 'lazy', decoding: 'async', draggable: 'false',
  });
  const score = fmtScore(hit.score);
  const card = h('button', {
    type: 'button', class: 'card', 'data-testid': 'result-card', 'data-id': hit.id,
    title: hit.path || '', onclick: () => openImage(hit.id, hit),
  },
  h('span', { class: 'card-thumb' }, img, score ? h('span', { class: 'score', title: 'Score' }, score) : null),
  h('span', { class: 'card-text' },
    h('span', { class: 'card-caption' }, hit.caption || ''),
    h('span', { class: 'card-path' }, name)));
  img.addEventListener('error', () => card.classList.add('broken'), { once: true });
  return card;
}

/* --- query chips (image / similar queries) */

function renderQueryBar() {
  els.queryBar.replaceChildren();
  let chip = null;
  if (search.kind === 'image' && search.file) {
    chip = queryChip(search.fileUrl, `Image: ${search.file.name || 'dropped image'}`);
  } else if (search.kind === 'similar') {
    const hit = search.similar.hit || {};
    chip = queryChip(withToken(hit.thumbnail || thumbUrl(search.similar.id)),
      `Similar to ${basename(hit.path) || `#${search.similar.id}`}`);
  }
  els.queryBar.hidden = !chip;
  if (chip) els.queryBar.append(chip);
}

function queryChip(src, text) {
  return h('div', { class: 'query-chip' },
    h('img', { src, alt: '' }),
    h('span', { class: 'query-chip-text' }, text),
    h('button', { type: 'button', class: 'icon-btn small', 'aria-label': 'Clear image query', onclick: clearQuery }, icon('x')));
}

function releaseFile() {
  if (search.fileUrl) URL.revokeObjectURL(search.fileUrl);
  search.file = null;
  search.fileUrl = null;
}

function clearQuery() {
  releaseFile();
  search.similar = null;
  search.q = els.q.value.trim();
  search.kind = search.q ? 'text' : null;
  renderQueryBar();
  startSearch();
  els.q.focus();
}

function startImageSearch(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith('image/')) {
    toast(`“${file.name}” is not an image.`, 'error');
    return;
  }
  releaseFile();
  search.kind = 'image';
  search.file = file;
  search.fileUrl = URL.createObjectURL(file);
  search.similar = null;
  els.q.value = '';
  search.q = '';
  renderQueryBar();
  startSearch();
}

function startSimilar(id, hit) {
  releaseFile();
  search.kind = 'similar';
  search.similar = { id, hit };
  els.q.value = '';
  search.q = '';
  renderQueryBar();
  startSearch();
  window.scrollTo({ top: 0 });
}

function onSearchInput() {
  const q = els.q.value.trim();
  search.q = q;
  if (q) {
    // Typing replaces an image query.
    if (search.kind !== 'text') {
      releaseFile();
      search.similar = null;
      renderQueryBar();
    }
    search.kind = 'text';
  } else if (search.kind === 'text') {
    search.kind = null;
  }
  scheduleSearch();
}

/** The negative text only steers the vector part: off in text mode. */
function syncNegative() {
  els.negative.disabled = els.mode.value === 'text';
}

function onFiltersChanged() {
  updateFilterBadge();
  if (search.kind) scheduleSearch();
  else renderResultState();
}

function clearFilters() {
  for (const input of [els.fFolder, els.fFrom, els.fTo, els.fCamera, els.fType, els.fLabel, els.fMinScore]) input.value = '';
  els.fSort.value = 'relevance';
  onFiltersChanged();
}

function toggleFilters(open = els.filters.hidden) {
  els.filters.hidden = !open;
  els.filtersToggle.setAttribute('aria-expanded', String(open));
  updateBodyState();
  if (open) els.fFolder.focus();
}

/** Sets the label filter (`SET:LABEL`) and re-runs the current query. */
function applyLabelFilter(set, label) {
  const value = `${set}:${label}`;
  if (![...els.fLabel.options].some((o) => o.value === value)) {
    els.fLabel.append(h('option', { value }, value));
  }
  els.fLabel.value = value;
  onFiltersChanged();
  toast(`Filter: ${value}${search.kind ? '' : ' — type a search to use it'}`);
}

/* --- drag & drop, paste, file picker */

let dragDepth = 0;
const hasFiles = (event) => !!event.dataTransfer && [...event.dataTransfer.types].includes('Files');

function onDragEnter(event) {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth++;
  els.dropOverlay.hidden = false;
}

function onDragLeave(event) {
  if (!hasFiles(event)) return;
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) els.dropOverlay.hidden = true;
}

function onDragOver(event) {
  if (!hasFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = 'copy';
}

function onDrop(event) {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  els.dropOverlay.hidden = true;
  const files = [...event.dataTransfer.files];
  startImageSearch(files.find((f) => f.type.startsWith('image/')) || files[0]);
}

function onPaste(event) {
  const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith('image/'));
  if (!files.length) return;
  event.preventDefault();
  startImageSearch(files[0]);
}

function onFilePicked() {
  const file = els.dropInput.files && els.dropInput.files[0];
  if (file) startImageSearch(file);
  els.dropInput.value = ''; // so that picking the same file again fires `change`
}

/* ------------------------------------------------------------------ image view */

const view = {
  id: null,
  hit: null,         // what we know about the open image (a Hit, later the full record)
  seq: 0,            // bumps per opened image so late answers are dropped
  returnFocus: null,
};

const chat = {
  convId: null,
  list: [],
  abort: null,
  busy: false,
};

function openImage(id, hit) {
  const wasOpen = !els.view.hidden;
  if (!wasOpen) view.returnFocus = document.activeElement;
  view.seq++;
  view.id = id;
  view.hit = hit || { id };
  stopChat();
  chat.convId = null;
  chat.list = [];
  els.chatLog.replaceChildren();
  els.convList.replaceChildren();
  els.convList.hidden = true;
  els.chatInput.value = '';
  els.viewError.hidden = true;

  renderImageInfo(view.hit);
  setViewImage(id, view.hit);
  markSelectedCard(id);

  els.view.hidden = false;
  updateBodyState();
  els.viewBody.scrollTop = 0;
  if (!wasOpen) els.closeView.focus();

  loadImageDetail(id, view.seq);
  loadConversations(id, view.seq);
}

function closeImageView() {
  if (els.view.hidden) return;
  stopChat();
  view.seq++;
  view.id = null;
  els.view.hidden = true;
  els.viewImg.removeAttribute('src');
  els.viewLow.removeAttribute('src');
  markSelectedCard(null);
  updateBodyState();
  const back = view.returnFocus;
  view.returnFocus = null;
  if (back && back.isConnected && typeof back.focus === 'function') back.focus();
}

/** Outlines the grid card of the open image. */
function markSelectedCard(id) {
  for (const card of els.grid.querySelectorAll('.card.selected')) card.classList.remove('selected');
  if (id == null) return;
  const card = els.grid.querySelector(`.card[data-id="${CSS.escape(String(id))}"]`);
  if (card) card.classList.add('selected');
}

/** Shows the cached small thumbnail at once, the 1024 px one fades in over it. */
function setViewImage(id, hit) {
  els.viewImg.parentElement.classList.remove('loaded');
  els.viewImg.removeAttribute('src'); // so that `load` fires even for the same URL
  els.viewLow.src = withToken(hit.thumbnail || thumbUrl(id));
  els.viewImg.alt = hit.caption || basename(hit.path) || `Image ${id}`;
  els.viewImg.src = withToken(thumbUrl(id, 1024));
}

async function loadImageDetail(id, seq) {
  try {
    const detail = await api(`/api/images/${encodeURIComponent(id)}`);
    if (seq !== view.seq) return;
    view.hit = { ...view.hit, ...detail };
    renderImageInfo(view.hit);
  } catch (err) {
    if (seq !== view.seq) return;
    els.viewError.textContent = err.message;
    els.viewError.hidden = false;
  }
}

function renderImageInfo(info) {
  const id = view.id;
  els.viewTitle.textContent = basename(info.path) || `Image #${id}`;
  els.originalBtn.href = withToken(info.original || `/api/images/${encodeURIComponent(id)}/original`);
  setCaption(info.caption, info.caption_model || info.model, 'caption' in info);
  renderViewLabels(info.labels);
  renderDetails(info);
}

/** `known`: whether we know for sure if there is a caption (the Hit tells us). */
function setCaption(caption, model, known = true) {
  els.caption.textContent = caption || '';
  els.captionModel.textContent = caption && model ? `Captioned by ${model}` : '';
  els.captionNow.hidden = !!caption || !known;
}

function renderViewLabels(labels) {
  els.viewLabels.replaceChildren();
  for (const [set, label] of Object.entries(labels || {})) {
    if (label == null || label === '') continue;
    els.viewLabels.append(h('button', {
      type: 'button', class: 'chip', title: `Filter results by ${set}:${label}`,
      onclick: () => applyLabelFilter(set, label),
    }, h('span', { class: 'chip-key' }, set), String(label)));
  }
}

function renderDetails(info) {
  const exif = info.exif || {};
  const gps = typeof exif.gps_lat === 'number' && typeof exif.gps_lon === 'number'
    ? `${exif.gps_lat.toFixed(5)}, ${exif.gps_lon.toFixed(5)}` : '';
  const rows = [
    ['Path', info.path],
    ['Size', fmtBytes(info.size)],
    ['Dimensions', info.width && info.height ? `${info.width} × ${info.height}` : ''],
    ['Format', info.format ? String(info.format).toUpperCase() : ''],
    ['Taken', fmtDate(info.taken_at)],
    ['Camera', info.camera],
    ['Camera make', exif.camera_make],
    ['Camera model', exif.camera_model],
    ['EXIF date', exif.taken_at],
    ['Orientation', exif.orientation],
    ['GPS', gps],
    ['Id', info.id ?? view.id],
  ];
  els.exif.replaceChildren(h('tbody', {}, rows
    .filter(([, value]) => value !== undefined && value !== null && value !== '')
    .map(([key, value]) => h('tr', {}, h('th', { scope: 'row' }, key), h('td', {}, String(value))))));
}

async function captionNow() {
  const id = view.id, seq = view.seq;
  const button = els.captionNow;
  button.disabled = true;
  button.classList.add('busy');
  button.lastElementChild.textContent = 'Captioning…';
  try {
    const res = await api(`/api/images/${encodeURIComponent(id)}/caption`, { method: 'POST', json: {} });
    updateHitCaption(id, res.caption);
    if (seq !== view.seq) return;
    view.hit = { ...view.hit, caption: res.caption };
    setCaption(res.caption, res.model);
  } catch (err) {
    if (seq === view.seq) toast(err.message, 'error', 10000);
  } finally {
    button.disabled = false;
    button.classList.remove('busy');
    button.lastElementChild.textContent = 'Caption now';
  }
}

/** Keeps the grid card in step with a fresh caption. */
function updateHitCaption(id, caption) {
  const hit = search.hits.find((x) => x.id === id);
  if (hit) hit.caption = caption;
  const card = els.grid.querySelector(`.card[data-id="${CSS.escape(String(id))}"]`);
  const text = card && card.querySelector('.card-caption');
  if (text) text.textContent = caption || '';
}

function moreLikeThis() {
  if (view.id == null) return;
  const id = view.id, hit = view.hit;
  closeImageView();
  // On a phone the labelling sheet would hide the new results.
  if (window.matchMedia('(max-width: 640px)').matches) closeLabelView();
  startSimilar(id, hit);
}

/** ←/→ walk through the grid while the view is open. */
function stepImage(delta) {
  const i = search.hits.findIndex((x) => x.id === view.id);
  if (i < 0) return;
  const next = search.hits[i + delta];
  if (next) openImage(next.id, next);
  if (i + delta >= search.hits.length - 4) maybeLoadMore();
}

/* --- chat */

async function loadConversations(imageId, seq) {
  try {
    const list = await api('/api/conversations', { query: { image_id: imageId } });
    if (seq !== view.seq) return;
    chat.list = Array.isArray(list) ? list : [];
    renderConversationList();
  } catch (err) {
    if (seq === view.seq && !isAbort(err)) console.warn('conversations:', err.message);
  }
}

function renderConversationList() {
  els.convList.replaceChildren(...chat.list.map((conv) => {
    const active = conv.id === chat.convId;
    return h('button', {
      type: 'button', class: `conv${active ? ' active' : ''}`, 'aria-pressed': String(active),
      onclick: () => resumeConversation(conv.id),
    },
    h('span', { class: 'conv-title' }, conv.title || 'Untitled conversation'),
    h('span', { class: 'conv-date' }, fmtDate(conv.created_at)));
  }));
  els.convList.hidden = chat.list.length === 0;
}

function newConversation() {
  stopChat();
  chat.convId = null;
  els.chatLog.replaceChildren();
  renderConversationList();
  els.chatInput.focus();
}

async function resumeConversation(convId) {
  stopChat();
  const seq = view.seq;
  chat.convId = convId;
  renderConversationList();
  els.chatLog.replaceChildren(h('p', { class: 'muted small' }, 'Loading conversation…'));
  try {
    const conv = await api(`/api/conversations/${encodeURIComponent(convId)}`);
    if (seq !== view.seq || chat.convId !== convId) return;
    els.chatLog.replaceChildren();
    let lastAnswer = null;
    for (const msg of conv.messages || []) {
      const text = appendMessage(msg.role, msg.text);
      if (msg.role === 'assistant') lastAnswer = text;
    }
    if (lastAnswer) {
      markLatestAnswer(lastAnswer);
      lastAnswer.dataset.done = 'true';
    }
    els.chatLog.lastElementChild?.scrollIntoView({ block: 'nearest' });
  } catch (err) {
    if (seq !== view.seq) return;
    els.chatLog.replaceChildren(h('p', { class: 'error-text' }, err.message));
  }
}

/** Appends a message bubble; returns the element holding its text. */
function appendMessage(role, text) {
  const body = h('p', { class: 'msg-text' }, text || '');
  els.chatLog.append(h('div', { class: `msg ${role === 'user' ? 'user' : 'assistant'}` },
    h('span', { class: 'msg-role' }, role === 'user' ? 'You' : 'magpie'), body));
  return body;
}

/** Only the latest assistant answer carries data-testid="chat-answer". */
function markLatestAnswer(el) {
  for (const old of els.chatLog.querySelectorAll('[data-testid="chat-answer"]')) old.removeAttribute('data-testid');
  el.setAttribute('data-testid', 'chat-answer');
}

function setChatBusy(busy) {
  chat.busy = busy;
  els.chatSend.disabled = busy;
  els.chatSend.classList.toggle('busy', busy);
}

function stopChat() {
  if (chat.abort) chat.abort.abort();
  chat.abort = null;
  setChatBusy(false);
}

async function onChatSubmit(event) {
  event.preventDefault();
  const question = els.chatInput.value.trim();
  if (!question || chat.busy || view.id == null) return;
  const seq = view.seq, imageId = view.id;
  setChatBusy(true);
  const controller = new AbortController();
  chat.abort = controller;

  // The first question of a fresh chat creates the conversation.
  if (chat.convId == null) {
    try {
      const conv = await api('/api/conversations', { method: 'POST', json: { image_id: imageId }, signal: controller.signal });
      if (seq !== view.seq) return;
      chat.convId = conv.id;
      chat.list = [conv, ...chat.list.filter((c) => c.id !== conv.id)];
      renderConversationList();
    } catch (err) {
      if (seq === view.seq && !isAbort(err)) {
        toast(err.message, 'error');
        setChatBusy(false);
      }
      return;
    }
  }

  els.chatInput.value = '';
  appendMessage('user', question);
  const answer = appendMessage('assistant', '');
  answer.classList.add('pending');
  markLatestAnswer(answer);
  answer.scrollIntoView({ block: 'nearest' });

  await streamAnswer(chat.convId, question, answer, controller.signal);

  if (chat.abort === controller) {
    chat.abort = null;
    setChatBusy(false);
  }
  if (seq === view.seq) {
    loadConversations(imageId, seq); // the title is set by the first question
    els.chatInput.focus();
  }
}

/**
 * POST the question and read the `text/event-stream` answer with fetch (EventSource
 * cannot POST): `token` pieces are appended live, `done` carries the whole answer.
 */
async function streamAnswer(convId, question, answer, signal) {
  let finished = false;
  let scrollQueued = false;
  const keepInView = () => {
    if (scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => { scrollQueued = false; answer.scrollIntoView({ block: 'nearest' }); });
  };
  try {
    const res = await fetch(withToken(`/api/conversations/${encodeURIComponent(convId)}/messages`), {
      method: 'POST',
      headers: authHeaders({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
      body: JSON.stringify({ question }),
      signal,
    });
    if (!res.ok) throw await errorFrom(res); // validation errors come as plain JSON
    if (!res.body) throw new Error('This browser cannot read streamed answers.');
    await readEventStream(res.body, (event, data) => {
      const payload = parseJson(data);
      if (event === 'token') {
        answer.classList.remove('pending');
        answer.append(payload && typeof payload.text === 'string' ? payload.text : '');
        keepInView();
      } else if (event === 'done') {
        finished = true;
        if (payload && typeof payload.answer === 'string') answer.textContent = payload.answer;
        answer.dataset.done = 'true';
        return true; // stop reading
      } else if (event === 'error') {
        finished = true;
        showAnswerError(answer, payload?.error?.message || 'The model failed to answer.');
        return true;
      }
      return false;
    });
    if (!finished) showAnswerError(answer, 'The answer stream ended unexpectedly.');
  } catch (err) {
    if (isAbort(err)) {
      if (!finished) answer.dataset.stopped = 'true';
    } else if (!finished) {
      showAnswerError(answer, err.message === 'Failed to fetch' || err instanceof TypeError
        ? 'Cannot reach the magpie server.' : err.message);
    }
  } finally {
    answer.classList.remove('pending');
    keepInView();
  }
}

function showAnswerError(answer, message) {
  answer.classList.remove('pending');
  answer.classList.add('error-text');
  answer.dataset.error = 'true';
  const partial = answer.textContent;
  answer.textContent = partial ? `${partial}\n\n${message}` : message;
}

function parseJson(text) {
  try { return JSON.parse(text); } catch { return null; }
}

/**
 * Minimal server-sent-events reader (the parts of the spec the API uses): lines are
 * `field: value`, events end with a blank line, `data` lines join with "\n", lines
 * starting with ':' are comments. `onEvent(event, data)` returning true stops reading.
 */
async function readEventStream(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let eventType = '';
  let data = [];
  let stop = false;

  const dispatch = () => {
    if (data.length) stop = onEvent(eventType || 'message', data.join('\n')) === true;
    eventType = '';
    data = [];
  };
  const handleLine = (line) => {
    if (line === '') return dispatch();
    if (line.startsWith(':')) return undefined;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') eventType = value;
    else if (field === 'data') data.push(value);
    return undefined;
  };

  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      // Take complete lines. A '\r' at the very end may be half of "\r\n": wait for more.
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buffer);
        if (!m || stop) break;
        if (m[0] === '\r' && m.index === buffer.length - 1 && !done) break;
        handleLine(buffer.slice(0, m.index));
        buffer = buffer.slice(m.index + m[0].length);
      }
      if (stop) break;
      if (done) {
        // Be lenient with a last event that lacks its blank line.
        if (buffer) handleLine(buffer);
        buffer = '';
        dispatch();
        break;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/* ------------------------------------------------------------------ labelling view */

let labelSets = [];

function openLabelView() {
  els.labelView.hidden = false;
  els.labelTab.setAttribute('aria-expanded', 'true');
  updateBodyState();
  els.labelClasses.focus();
  loadLabelSets();
}

function closeLabelView() {
  if (els.labelView.hidden) return;
  els.labelView.hidden = true;
  els.labelTab.setAttribute('aria-expanded', 'false');
  updateBodyState();
  els.labelTab.focus();
}

function parseClasses(text) {
  const seen = new Set();
  const out = [];
  for (const part of text.split(',')) {
    const label = part.trim();
    const key = label.toLowerCase();
    if (label && !seen.has(key)) {
      seen.add(key);
      out.push(label);
    }
  }
  return out;
}

/** Chips mirror the comma list; × removes a class from it. */
function renderClassChips() {
  const classes = parseClasses(els.labelClasses.value);
  els.labelChips.replaceChildren(...classes.map((label) => h('span', { class: 'chip' }, label,
    h('button', {
      type: 'button', class: 'chip-x', 'aria-label': `Remove ${label}`,
      onclick: () => {
        els.labelClasses.value = parseClasses(els.labelClasses.value).filter((c) => c !== label).join(', ');
        renderClassChips();
      },
    }, icon('x')))));
}

function setLabelMsg(text, kind = '') {
  els.labelMsg.textContent = text;
  els.labelMsg.className = `form-msg ${kind}`;
}

/** The common part of a /api/classify body, or null (with a message) when invalid. */
function classifyBase() {
  const labels = parseClasses(els.labelClasses.value);
  if (labels.length < 2 || labels.length > 100) {
    setLabelMsg('Enter between 2 and 100 classes, separated by commas.', 'error');
    els.labelClasses.focus();
    return null;
  }
  const template = els.labelTemplate.value.trim();
  if (template && !template.includes('{}')) {
    setLabelMsg('The template must contain {} where the class goes.', 'error');
    els.labelTemplate.focus();
    return null;
  }
  return { labels, template: template || undefined };
}

async function runLabelsOnResults(event) {
  event.preventDefault();
  const base = classifyBase();
  if (!base) return;
  const ids = search.hits.map((hit) => hit.id);
  if (!ids.length) {
    setLabelMsg('There are no results to label: search first.', 'error');
    return;
  }
  const storeAs = els.labelStore.value.trim();
  setBusy(els.labelRun, true);
  setLabelMsg(`Classifying ${fmtNum(ids.length)} images…`);
  try {
    const res = await api('/api/classify', {
      method: 'POST', json: { ...base, ids, store_as: storeAs || undefined },
    });
    renderLabelResults(res, base.labels);
    setLabelMsg(`${fmtNum(res.results?.length ?? 0)} images classified${res.stored_as ? `, saved as “${res.stored_as}”` : ''}.`, 'ok');
    if (res.stored_as) loadLabelSets();
  } catch (err) {
    setLabelMsg(err.message, 'error');
  } finally {
    setBusy(els.labelRun, false);
  }
}

async function labelWholeLibrary() {
  const base = classifyBase();
  if (!base) return;
  const storeAs = els.labelStore.value.trim();
  if (!storeAs) {
    setLabelMsg('Labelling the whole library needs a “Save as” name.', 'error');
    els.labelStore.focus();
    return;
  }
  setBusy(els.labelAll, true);
  try {
    const res = await api('/api/classify', { method: 'POST', json: { ...base, all: true, store_as: storeAs } });
    const job = res && res.job ? res.job : res;
    if (job && job.id != null) trackJob(job);
    setLabelMsg(`Labelling the whole library as “${storeAs}”: progress is in the status bar.`, 'ok');
  } catch (err) {
    setLabelMsg(err.message, 'error');
  } finally {
    setBusy(els.labelAll, false);
  }
}

function setBusy(button, busy) {
  button.disabled = busy;
  button.classList.toggle('busy', busy);
}

/** One group per class (in the order asked), thumbnails sorted by probability. */
function renderLabelResults(res, asked) {
  const labels = Array.isArray(res.labels) && res.labels.length ? res.labels : asked;
  const groups = new Map(labels.map((label) => [label, []]));
  for (const item of res.results || []) {
    if (!groups.has(item.label)) groups.set(item.label, []);
    groups.get(item.label).push(item);
  }
  const prob = (item) => (item.probs && typeof item.probs[item.label] === 'number' ? item.probs[item.label] : 0);
  els.labelResults.replaceChildren(...[...groups].map(([label, items]) => {
    items.sort((a, b) => prob(b) - prob(a));
    return h('section', { class: 'label-group', 'data-testid': 'label-group', 'data-label': label },
      h('h4', { class: 'label-group-head' },
        h('span', { class: 'label-name' }, label),
        h('span', { class: 'label-count' }, `${fmtNum(items.length)} image${items.length === 1 ? '' : 's'}`)),
      items.length
        ? h('div', { class: 'mini-grid' }, items.map((item) => labelThumb(item, prob(item))))
        : h('p', { class: 'muted small' }, 'No images'));
  }));
}

function labelThumb(item, p) {
  const hit = { id: item.id, path: item.path, thumbnail: item.thumbnail };
  const probs = Object.entries(item.probs || {}).sort((a, b) => b[1] - a[1])
    .map(([label, value]) => `${label}: ${pct(value)}`).join('\n');
  return h('button', {
    type: 'button', class: 'mini', 'data-id': item.id, title: `${item.path || ''}\n${probs}`.trim(),
    onclick: () => openImage(item.id, hit),
  },
  h('img', { src: withToken(item.thumbnail || thumbUrl(item.id)), alt: basename(item.path), loading: 'lazy', decoding: 'async' }),
  h('span', { class: 'prob' }, pct(p)));
}

async function loadLabelSets() {
  try {
    const sets = await api('/api/labels');
    labelSets = Array.isArray(sets) ? sets : [];
  } catch (err) {
    if (err.status !== 401) console.warn('labels:', err.message);
    return;
  }
  renderLabelFilterOptions();
  renderLabelSets();
}

/** The filter's options: `SET:LABEL`, grouped by set. Keeps the current choice. */
function renderLabelFilterOptions() {
  const current = els.fLabel.value;
  const options = [h('option', { value: '' }, 'Any')];
  for (const set of labelSets) {
    options.push(h('optgroup', { label: set.name },
      Object.entries(set.labels || {}).map(([label, count]) =>
        h('option', { value: `${set.name}:${label}` }, `${label} (${fmtNum(count)})`))));
  }
  els.fLabel.replaceChildren(...options);
  if (current && ![...els.fLabel.options].some((o) => o.value === current)) {
    els.fLabel.append(h('option', { value: current }, current));
  }
  els.fLabel.value = current;
}

function renderLabelSets() {
  if (!labelSets.length) {
    els.labelSets.replaceChildren(h('p', { class: 'muted small' },
      'No saved label sets yet. Give a “Save as” name to keep the labels.'));
    return;
  }
  els.labelSets.replaceChildren(...labelSets.map((set) => {
    const exportUrl = (format) => withToken(`/api/labels/${encodeURIComponent(set.name)}?format=${format}`);
    return h('div', { class: 'set-card' },
      h('div', { class: 'set-head' },
        h('strong', { class: 'set-name' }, set.name),
        h('span', { class: 'muted small' }, `${fmtNum(set.images)} images`)),
      h('div', { class: 'chips' }, Object.entries(set.labels || {}).map(([label, count]) =>
        h('button', {
          type: 'button', class: 'chip', title: `Filter results by ${set.name}:${label}`,
          onclick: () => applyLabelFilter(set.name, label),
        }, label, h('span', { class: 'chip-count' }, fmtNum(count))))),
      h('div', { class: 'set-actions' },
        h('a', { class: 'btn small', href: exportUrl('csv'), download: `${set.name}.csv` }, icon('download'), 'CSV'),
        h('a', { class: 'btn small', href: exportUrl('json'), download: `${set.name}.json` }, icon('download'), 'JSON'),
        h('button', {
          type: 'button', class: 'btn small danger', onclick: () => deleteLabelSet(set.name),
        }, icon('trash'), 'Delete')));
  }));
}

async function deleteLabelSet(name) {
  if (!window.confirm(`Delete the label set “${name}”? The labels of all its images are removed.`)) return;
  try {
    const res = await api(`/api/labels/${encodeURIComponent(name)}`, { method: 'DELETE' });
    toast(`Deleted “${name}” (${fmtNum(res?.deleted ?? 0)} labels).`);
    loadLabelSets();
  } catch (err) {
    toast(err.message, 'error');
  }
}

/* ------------------------------------------------------------------ status & jobs */

const JOB_NAMES = { index: 'Indexing', caption: 'Captioning', classify: 'Labelling' };

/** Jobs shown in the status bar: running ones, and finished ones for a short while. */
const shownJobs = new Map(); // id → {job, row, finishedAt}
let statusTimer = null;
let statusInFlight = false;
let statusAgain = false;

function anyJobRunning() {
  for (const entry of shownJobs.values()) if (entry.job.state === 'running') return true;
  return false;
}

function nextPollDelay() {
  if (document.hidden) return POLL_HIDDEN_MS;
  return anyJobRunning() ? POLL_RUNNING_MS : POLL_IDLE_MS;
}

async function pollStatus() {
  if (statusInFlight) { statusAgain = true; return; }
  statusInFlight = true;
  clearTimeout(statusTimer);
  try {
    const status = await api('/api/status');
    renderCounts(status);
    const jobs = Array.isArray(status.jobs) ? status.jobs : [];
    for (const job of jobs) {
      if (job.state === 'running' || shownJobs.has(job.id)) updateJob(job);
    }
    // Jobs we watch that the status does not list (any more): ask for them directly.
    const listed = new Set(jobs.map((job) => job.id));
    const missing = [...shownJobs.values()].filter((e) => e.job.state === 'running' && !listed.has(e.job.id));
    await Promise.all(missing.map((e) => api(`/api/jobs/${encodeURIComponent(e.job.id)}`).then(updateJob, () => {})));
  } catch (err) {
    renderStatusError(err);
  } finally {
    statusInFlight = false;
    pruneJobs();
    if (statusAgain) {
      statusAgain = false;
      setTimeout(pollStatus, 0);
    } else {
      statusTimer = setTimeout(pollStatus, nextPollDelay());
    }
  }
}

function renderCounts(status) {
  const images = status.images || {};
  const parts = [`${fmtNum(images.indexed ?? 0)} images`];
  if (images.pending) parts.push(`${fmtNum(images.pending)} pending`);
  if (images.failed) parts.push(`${fmtNum(images.failed)} failed`);
  if (typeof status.captions === 'number') parts.push(`${fmtNum(status.captions)} captioned`);
  const fresh = (status.index?.up_to_date ?? true) && (status.text_index?.up_to_date ?? true);
  if (!fresh) parts.push('index updating');
  els.statusCounts.textContent = parts.join(' · ');
  els.statusDot.className = `dot ${fresh ? 'ok' : 'warn'}`;

  const details = [
    status.model && `CLIP model: ${status.model}`,
    status.caption_model && `Caption model: ${status.caption_model}`,
    status.index && `Vector index: ${status.index.kind ?? '?'}, ${fmtNum(status.index.vectors)} vectors${status.index.up_to_date ? '' : ' (not up to date)'}`,
    status.text_index && `Text index: ${fmtNum(status.text_index.documents)} documents${status.text_index.up_to_date ? '' : ' (not up to date)'}`,
    images.deleted ? `${fmtNum(images.deleted)} deleted` : '',
    Array.isArray(status.roots) && status.roots.length ? `Folders: ${status.roots.join(', ')}` : '',
  ].filter(Boolean);
  els.statusCounts.title = details.join('\n');

  if (Array.isArray(status.roots)) {
    els.rootList.replaceChildren(...status.roots.map((root) => h('option', { value: root })));
  }
  els.tokenButton.hidden = true;
}

function renderStatusError(err) {
  els.statusDot.className = 'dot err';
  els.statusCounts.title = err.message;
  els.statusCounts.textContent = err.status === 401 ? 'Locked: enter the access token'
    : err.status === 0 ? 'Server unreachable, retrying…' : err.message;
}

/** Starts showing a job we just created (POST answers carry the Job). */
function trackJob(job) {
  updateJob(job);
  clearTimeout(statusTimer);
  statusTimer = setTimeout(pollStatus, POLL_RUNNING_MS);
}

function updateJob(job) {
  if (!job || job.id == null) return;
  let entry = shownJobs.get(job.id);
  const previous = entry ? entry.job.state : null;
  if (!entry) {
    entry = { job, row: createJobRow(job), finishedAt: null };
    shownJobs.set(job.id, entry);
    els.jobs.append(entry.row.el);
  }
  entry.job = job;
  if (job.state !== 'running' && entry.finishedAt == null) entry.finishedAt = Date.now();
  renderJobRow(entry);
  els.jobs.hidden = shownJobs.size === 0;
  if (previous === 'running' && job.state !== 'running') onJobFinished(job);
}

function createJobRow(job) {
  const name = h('span', { class: 'job-name' });
  const fill = h('span', { class: 'bar-fill' });
  const bar = h('span', { class: 'bar', role: 'progressbar', 'aria-valuemin': '0' }, fill);
  const text = h('span', { class: 'job-text' });
  const action = h('button', { type: 'button', class: 'icon-btn small' }, icon('x'));
  const el = h('div', { class: 'job', 'data-job-id': job.id }, name, bar, text, action);
  action.addEventListener('click', () => {
    const entry = shownJobs.get(job.id);
    if (entry && entry.job.state === 'running') cancelJob(job.id, action);
    else dismissJob(job.id);
  });
  return { el, name, bar, fill, text, action };
}

function renderJobRow(entry) {
  const { job, row } = entry;
  const p = job.progress || {};
  const done = Number(p.done) || 0;
  const total = Number(p.total) || 0;
  const running = job.state === 'running';
  row.el.dataset.state = job.state;
  row.name.textContent = JOB_NAMES[job.kind] || job.kind || 'Job';

  let ratio = total > 0 ? Math.min(1, done / total) : 0;
  if (job.state === 'done') ratio = 1;
  row.fill.style.width = `${(ratio * 100).toFixed(1)}%`;
  row.bar.classList.toggle('indeterminate', running && total === 0);
  row.bar.setAttribute('aria-valuemax', String(total || 100));
  row.bar.setAttribute('aria-valuenow', String(total ? done : Math.round(ratio * 100)));
  row.bar.setAttribute('aria-label', `${row.name.textContent} progress`);

  const parts = [];
  if (running) {
    parts.push(total ? `${fmtNum(done)} / ${fmtNum(total)}` : `${fmtNum(done)} done`);
    if (p.failed) parts.push(`${fmtNum(p.failed)} failed`);
    if (typeof p.rate === 'number' && p.rate > 0) parts.push(`${p.rate >= 10 ? p.rate.toFixed(0) : p.rate.toFixed(1)}/s`);
    const eta = fmtDuration(p.eta_seconds);
    if (eta) parts.push(`ETA ${eta}`);
  } else if (job.state === 'done') {
    parts.push(`Done${total ? `: ${fmtNum(done)} / ${fmtNum(total)}` : ''}`);
    if (p.failed) parts.push(`${fmtNum(p.failed)} failed`);
  } else if (job.state === 'failed') {
    parts.push(`Failed${job.error ? `: ${job.error}` : ''}`);
  } else if (job.state === 'cancelled') {
    parts.push('Cancelled');
  } else {
    parts.push(String(job.state || ''));
  }
  row.text.textContent = parts.join(' · ');
  row.text.title = row.text.textContent;

  if (!row.action.classList.contains('cancelling') || !running) {
    row.action.classList.remove('cancelling');
    row.action.disabled = false;
  }
  row.action.setAttribute('aria-label', running ? `Cancel ${row.name.textContent.toLowerCase()}` : 'Dismiss');
  row.action.title = running ? 'Cancel' : 'Dismiss';
}

async function cancelJob(id, button) {
  button.disabled = true;
  button.classList.add('cancelling');
  try {
    const job = await api(`/api/jobs/${encodeURIComponent(id)}`, { method: 'DELETE' });
    if (job && job.id != null) updateJob(job);
    toast('Cancelling…');
  } catch (err) {
    button.disabled = false;
    button.classList.remove('cancelling');
    toast(err.message, 'error');
  }
  trackJob(shownJobs.get(id)?.job);
}

function dismissJob(id) {
  const entry = shownJobs.get(id);
  if (!entry) return;
  entry.row.el.remove();
  shownJobs.delete(id);
  els.jobs.hidden = shownJobs.size === 0;
}

function pruneJobs() {
  const now = Date.now();
  for (const [id, entry] of shownJobs) {
    if (entry.finishedAt != null && now - entry.finishedAt > FINISHED_JOB_MS) dismissJob(id);
  }
}

function onJobFinished(job) {
  const name = JOB_NAMES[job.kind] || 'Job';
  if (job.state === 'done') {
    const r = job.result || {};
    let extra = '';
    if (job.kind === 'classify' && r.counts) {
      extra = `: ${Object.entries(r.counts).map(([label, n]) => `${label} ${fmtNum(n)}`).join(', ')}`;
    } else if (typeof r.images === 'number') {
      extra = `: ${fmtNum(r.images)} images`;
    }
    toast(`${name} finished${extra}.`, 'ok');
  } else if (job.state === 'failed') {
    toast(`${name} failed${job.error ? `: ${job.error}` : ''}.`, 'error', 10000);
  }
  if (job.kind === 'classify') loadLabelSets();
}

async function startJob(kind, button) {
  setBusy(button, true);
  try {
    const res = await api(`/api/jobs/${kind}`, { method: 'POST', json: {} });
    const job = res && res.job ? res.job : res;
    if (job && job.id != null) trackJob(job);
  } catch (err) {
    toast(err.message, 'error');
    if (err.code === 'job_running') pollStatus();
  } finally {
    setBusy(button, false);
  }
}

/* ------------------------------------------------------------------ panels & keys */

/** Body classes drive layout: on wide screens open panels push the page aside. */
function updateBodyState() {
  document.body.classList.toggle('image-open', !els.view.hidden);
  document.body.classList.toggle('labels-open', !els.labelView.hidden);
  document.body.classList.toggle('filters-open', !els.filters.hidden);
}

const isTyping = (el) => !!el && (el.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(el.tagName));

function onKeyDown(event) {
  if (event.key === 'Escape') {
    if (els.tokenDialog.open) return; // the dialog handles it
    if (!els.view.hidden) { event.preventDefault(); closeImageView(); return; }
    if (!els.filters.hidden) { event.preventDefault(); toggleFilters(false); els.filtersToggle.focus(); return; }
    if (!els.labelView.hidden) { event.preventDefault(); closeLabelView(); }
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || isTyping(document.activeElement)) return;
  if (event.key === '/') {
    event.preventDefault();
    els.q.focus();
    els.q.select();
  } else if (!els.view.hidden && (event.key === 'ArrowRight' || event.key === 'ArrowLeft')) {
    event.preventDefault();
    stepImage(event.key === 'ArrowRight' ? 1 : -1);
  }
}

/* ------------------------------------------------------------------ wiring */

function init() {
  readTokenFromUrl();

  // Search
  els.form.addEventListener('submit', (event) => { event.preventDefault(); onSearchInput(); startSearch(); });
  els.q.addEventListener('input', onSearchInput);
  els.mode.addEventListener('change', () => {
    syncNegative();
    if (search.kind === 'text') startSearch();
  });
  syncNegative();
  els.negative.addEventListener('input', () => { if (search.kind === 'text') scheduleSearch(); });
  els.searchRetry.addEventListener('click', retrySearch);
  els.dropInput.addEventListener('change', onFilePicked);

  // Filters
  els.filtersToggle.addEventListener('click', () => toggleFilters());
  els.filtersClose.addEventListener('click', () => toggleFilters(false));
  els.filtersDone.addEventListener('click', () => toggleFilters(false));
  els.filtersClear.addEventListener('click', clearFilters);
  for (const input of [els.fFolder, els.fCamera, els.fMinScore]) input.addEventListener('input', onFiltersChanged);
  for (const input of [els.fFrom, els.fTo, els.fType, els.fLabel, els.fSort]) input.addEventListener('change', onFiltersChanged);

  // Infinite scroll: a sentinel below the grid, observed with a generous margin.
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) maybeLoadMore();
  }, { rootMargin: '0px 0px 800px 0px' }).observe(els.sentinel);

  // Drag & drop / paste anywhere
  window.addEventListener('dragenter', onDragEnter);
  window.addEventListener('dragleave', onDragLeave);
  window.addEventListener('dragover', onDragOver);
  window.addEventListener('drop', onDrop);
  document.addEventListener('paste', onPaste);

  // Image view
  els.closeView.addEventListener('click', closeImageView);
  els.captionNow.addEventListener('click', captionNow);
  els.moreLikeThis.addEventListener('click', moreLikeThis);
  els.chatNew.addEventListener('click', newConversation);
  els.chatForm.addEventListener('submit', onChatSubmit);
  els.viewImg.addEventListener('load', () => els.viewImg.parentElement.classList.add('loaded'));

  // Labelling view
  els.labelTab.addEventListener('click', () => (els.labelView.hidden ? openLabelView() : closeLabelView()));
  els.labelClose.addEventListener('click', closeLabelView);
  els.labelForm.addEventListener('submit', runLabelsOnResults);
  els.labelAll.addEventListener('click', labelWholeLibrary);
  els.labelClasses.addEventListener('input', renderClassChips);

  // Status bar
  els.indexButton.addEventListener('click', () => startJob('index', els.indexButton));
  els.captionAll.addEventListener('click', () => startJob('caption', els.captionAll));
  els.tokenButton.addEventListener('click', openTokenDialog);
  els.tokenForm.addEventListener('submit', onTokenSubmit);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) pollStatus(); });

  document.addEventListener('keydown', onKeyDown);

  // The filters panel sticks right under the top bar, whose height varies (it wraps).
  const topbar = document.querySelector('.topbar');
  new ResizeObserver(() => {
    document.documentElement.style.setProperty('--topbar-h', `${topbar.offsetHeight}px`);
  }).observe(topbar);

  renderResultState();
  updateFilterBadge();
  pollStatus();
  loadLabelSets();
  renderLabelSets();
  if (window.matchMedia('(min-width: 700px)').matches) els.q.focus();
}

init();

// fleet's dashboard: machines, units and the live event feed of one engine's API.
//
// Everything shown comes from /fleet/v1 with the caller's own credentials (a token kept in this
// tab's sessionStorage, or a client certificate). It loads the lists once, in large pages with
// the server filtering units, then follows /fleet/v1/events/stream: each event updates what it
// concerns (a unit is re-read in a batch with the others that changed), nothing is polled.
// Lists are virtualised (only the rows in view exist in the page), so 10,000 machines and
// 100,000 units stay usable.
'use strict';

const PAGE = 1000;
const ROW = 24;
const FEED_MAX = 500;

const S = {
  token: sessionStorage.getItem('fleet-token') || '',
  machines: new Map(), // id -> machine
  units: new Map(), // name -> unit (basic view) with .active/.sub from states
  states: new Map(), // name -> {active, sub, health}
  filter: { names: '', state: '' },
  lastEventId: null,
  dirtyUnits: new Set(),
  selected: null,
  generation: 0, // bumps when the unit filter changes: older loads stop
};

const $ = (id) => document.getElementById(id);

class Unauthorized extends Error {}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (S.token) headers.Authorization = 'Bearer ' + S.token;
  const resp = await fetch(path, Object.assign({}, opts, { headers, cache: 'no-store' }));
  if (resp.status === 401) throw new Unauthorized('The engine did not recognise you: sign in with an API token.');
  if (resp.status === 403) {
    const body = await resp.json().catch(() => ({}));
    throw new Unauthorized((body.error && body.error.message) || 'Your role may not read this.');
  }
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({}));
    throw new Error(`${path}: ${resp.status} ${(body.error && body.error.message) || resp.statusText}`);
  }
  return resp;
}

const json = async (path, opts) => (await api(path, opts)).json();

// --- sign in -----------------------------------------------------------------------------------

function showLogin(why) {
  $('app').hidden = true;
  $('detail').hidden = true;
  $('logout').hidden = true;
  $('login').hidden = false;
  $('login-why').textContent = why;
  $('token').focus();
}

$('login-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  S.token = $('token').value.trim();
  sessionStorage.setItem('fleet-token', S.token);
  $('token').value = '';
  start();
});

$('logout').addEventListener('click', () => {
  sessionStorage.removeItem('fleet-token');
  location.reload();
});

// --- virtualised lists -------------------------------------------------------------------------

// A list of `keys()` rendered by `row(key)` into a fixed-height scroller: only rows in view.
function virtualList(el, keys, row, onClick) {
  const spacer = document.createElement('div');
  el.appendChild(spacer);
  let pending = false;
  const draw = () => {
    pending = false;
    const all = keys();
    spacer.style.height = all.length * ROW + 'px';
    const first = Math.max(0, Math.floor(el.scrollTop / ROW) - 5);
    const last = Math.min(all.length, first + Math.ceil(el.clientHeight / ROW) + 10);
    const rows = [];
    for (let i = first; i < last; i++) {
      const r = row(all[i]);
      r.style.top = i * ROW + 'px';
      if (onClick) r.addEventListener('click', () => onClick(all[i]));
      rows.push(r);
    }
    el.replaceChildren(spacer, ...rows);
  };
  const redraw = () => {
    if (!pending) {
      pending = true;
      requestAnimationFrame(draw);
    }
  };
  el.addEventListener('scroll', redraw);
  window.addEventListener('resize', redraw);
  return redraw;
}

function cells(cls, values, attrs) {
  const r = document.createElement('div');
  r.className = 'row ' + cls;
  for (const [k, v] of Object.entries(attrs || {})) r.dataset[k] = v;
  for (const v of values) {
    const s = document.createElement('span');
    if (typeof v === 'object') {
      s.textContent = v.text;
      s.className = v.cls || '';
      if (v.title) s.title = v.title;
    } else s.textContent = v;
    r.appendChild(s);
  }
  return r;
}

const short = (id) => (id && id.length > 12 ? id.slice(0, 8) + '…' : id || '');
const machineName = (id) => {
  const m = S.machines.get(id);
  return m ? `${short(id)} ${m.primaryIP || ''}` : short(id);
};

let sortedMachines = [];
const drawMachines = virtualList($('machines'), () => sortedMachines, (id) => {
  const m = S.machines.get(id);
  const meta = Object.entries(m.metadata || {}).map(([k, v]) => `${k}=${v}`).join(' ');
  const state = m.drained ? { text: 'drained', cls: 'drained' } : { text: 'up', cls: 'active' };
  return cells('machines-row', [{ text: id, cls: 'mono', title: id }, m.primaryIP || '', String(m.units || 0), state, meta], { machine: id });
});

let sortedUnits = [];
const drawUnits = virtualList($('units'), () => sortedUnits, (name) => {
  const u = S.units.get(name);
  const st = S.states.get(name) || {};
  // A unit that declares its health shows it beside systemd's state (docs/services.md).
  const health = st.health ? ' · ' + st.health : '';
  const cls = st.health === 'unhealthy' ? 'failed' : st.active;
  const active = st.active ? { text: st.active + (st.sub ? '/' + st.sub : '') + health, cls } : '';
  return cells('units-row', [
    { text: name, title: name }, u.desiredState || '', u.currentState || '', active,
    { text: machineName(u.machineID), cls: 'mono', title: u.machineID || '' },
    { text: u.reason || u.moveRefused || '', title: u.reason || '' },
  ], { unit: name, current: u.currentState || '' });
}, (name) => openDetail(name));

function machinesChanged() {
  sortedMachines = [...S.machines.keys()].sort();
  $('machine-count').textContent = `(${S.machines.size})`;
  drawMachines();
  drawUnits();
  summary();
}

function unitsChanged() {
  sortedUnits = [...S.units.keys()].sort();
  $('unit-count').textContent = `(${S.units.size}${S.filter.names || S.filter.state ? ' shown' : ''})`;
  drawUnits();
  summary();
}

function summary() {
  let active = 0;
  for (const s of S.states.values()) if (s.active === 'active') active++;
  $('summary').textContent = `${S.machines.size} machines · ${active} units active`;
}

// --- loading -----------------------------------------------------------------------------------

async function pages(path, params, each, stillWanted = () => true) {
  let token = '';
  for (;;) {
    const q = new URLSearchParams(Object.assign({ pageSize: PAGE }, params));
    if (token) q.set('nextPageToken', token);
    const page = await json(`${path}?${q}`);
    if (!stillWanted()) return;
    each(page);
    token = page.nextPageToken;
    if (!token) return;
  }
}

async function loadMachines() {
  const fresh = new Map();
  await pages('/fleet/v1/machines', {}, (p) => (p.machines || []).forEach((m) => fresh.set(m.id, m)));
  S.machines = fresh;
  machinesChanged();
}

function unitQuery() {
  const q = { view: 'basic' };
  if (S.filter.names) q.unitName = S.filter.names;
  if (S.filter.state) q.state = S.filter.state;
  return q;
}

async function loadUnits() {
  const gen = ++S.generation;
  S.units = new Map();
  unitsChanged();
  // Pages appear as they arrive: the first rows show at once, however many there are.
  await pages('/fleet/v1/units', unitQuery(), (p) => {
    (p.units || []).forEach((u) => S.units.set(u.name, u));
    unitsChanged();
  }, () => gen === S.generation);
}

async function loadStates() {
  await pages('/fleet/v1/state', {}, (p) => {
    (p.states || []).forEach((s) => S.states.set(s.name, { active: s.systemdActiveState, sub: s.systemdSubState, health: s.health }));
    drawUnits();
    summary();
  });
}

// A unit matches the filter as the server would decide it (names/globs and current state).
function globRe(g) {
  return new RegExp('^' + g.replace(/[.+^${}()|\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.') + '$');
}
function matches(u) {
  const names = S.filter.names.split(',').map((s) => s.trim()).filter(Boolean);
  if (names.length && !names.some((g) => globRe(g).test(u.name))) return false;
  const st = S.filter.state;
  if (!st) return true;
  if (st === 'unplaced') return u.desiredState !== 'inactive' && !u.machineID;
  return (u.currentState || 'inactive') === st;
}

// Units an event touched, re-read together a moment later (one request for many events).
let flushTimer = null;
function touchUnit(name) {
  S.dirtyUnits.add(name);
  if (!flushTimer) flushTimer = setTimeout(flushUnits, 150);
}

async function flushUnits() {
  flushTimer = null;
  const names = [...S.dirtyUnits].slice(0, 10000);
  names.forEach((n) => S.dirtyUnits.delete(n));
  if (S.dirtyUnits.size) flushTimer = setTimeout(flushUnits, 150);
  try {
    const found = await json('/fleet/v1/units:batchGet', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ names }),
    });
    for (const u of found.units || []) {
      delete u.options;
      if (matches(u)) S.units.set(u.name, u);
      else S.units.delete(u.name);
    }
    for (const n of found.missing || []) {
      S.units.delete(n);
      S.states.delete(n);
    }
    for (const s of found.states || []) S.states.set(s.name, { active: s.systemdActiveState, sub: s.systemdSubState, health: s.health });
    unitsChanged();
  } catch (e) {
    failed(e);
  }
}

// --- events ------------------------------------------------------------------------------------

function eventLine(e, withUnit = true) {
  const li = document.createElement('li');
  li.className = 'ev-' + e.kind;
  li.dataset.id = e.id;
  const time = document.createElement('span');
  time.className = 'ev-time';
  time.textContent = (e.time || '').replace('T', ' ').replace('Z', '');
  const kind = document.createElement('span');
  kind.className = 'ev-kind';
  kind.textContent = e.kind;
  const parts = [];
  if (withUnit && e.unit) parts.push(e.unit);
  if (e.from) parts.push(`from ${machineName(e.from)}`);
  if (e.machine) parts.push(e.from ? `to ${machineName(e.machine)}` : `on ${machineName(e.machine)}`);
  if (e.state) parts.push(e.state);
  if (e.reason) parts.push(`(${e.reason})`);
  li.append(time, ' ', kind, ' ', parts.join(' '));
  return li;
}

function showEvent(e) {
  const feed = $('events');
  feed.prepend(eventLine(e));
  while (feed.childElementCount > FEED_MAX) feed.lastElementChild.remove();
}

function apply(e) {
  showEvent(e);
  if (e.unit) {
    // What systemd reported is in the event itself; the rest is re-read.
    const st = S.states.get(e.unit) || {};
    if (e.kind === 'unit-started') S.states.set(e.unit, { active: 'active', sub: e.state || st.sub, health: st.health });
    if (e.kind === 'unit-failed') S.states.set(e.unit, { active: 'failed', sub: e.state || st.sub });
    if (e.kind === 'unit-health') S.states.set(e.unit, { ...st, active: st.active || 'active', health: e.state });
    if (e.kind === 'unit-stopped') S.states.set(e.unit, { active: 'inactive', sub: 'dead' });
    touchUnit(e.unit);
    // Machines' unit counts follow placements.
    const count = (id, d) => {
      const m = S.machines.get(id);
      if (m) m.units = Math.max(0, (m.units || 0) + d);
    };
    if (e.kind === 'unit-scheduled') count(e.machine, 1);
    if (e.kind === 'unit-moved') { count(e.machine, 1); count(e.from, -1); }
    if (e.kind === 'unit-unscheduled') count(e.machine, -1);
    drawMachines();
    if (S.selected === e.unit) $('detail-events').prepend(eventLine(e, false));
  }
  if (e.kind === 'machine-joined' || e.kind === 'machine-lost') {
    if (e.kind === 'machine-lost') S.machines.delete(e.machine);
    machinesChanged();
    reloadMachinesSoon();
  }
  if (e.kind === 'machine-drained' || e.kind === 'machine-undrained') {
    const m = S.machines.get(e.machine);
    if (m) m.drained = e.kind === 'machine-drained';
    drawMachines();
  }
  if (e.kind === 'leader-changed') status();
  if (e.kind === 'gap') { loadUnits(); loadStates(); reloadMachinesSoon(); }
}

let machinesTimer = null;
function reloadMachinesSoon() {
  if (!machinesTimer) machinesTimer = setTimeout(() => { machinesTimer = null; loadMachines().catch(failed); }, 300);
}

function live(on) {
  $('live').className = on ? 'on' : 'off';
  $('live').textContent = on ? 'live' : 'reconnecting';
}

// Server-sent events read with fetch (EventSource cannot send a token), resumed from the last
// event's id after any break: the engine (this one or another) sends what followed it.
async function follow() {
  for (;;) {
    try {
      const headers = { Accept: 'text/event-stream' };
      if (S.lastEventId) headers['Last-Event-ID'] = S.lastEventId;
      const resp = await api('/fleet/v1/events/stream', { headers });
      live(true);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          let data = '';
          let id = '';
          for (const line of block.split('\n')) {
            if (line.startsWith('data:')) data += line.slice(5).trimStart();
            else if (line.startsWith('id:')) id = line.slice(3).trim();
          }
          if (!data) continue;
          if (id) S.lastEventId = id;
          apply(JSON.parse(data));
        }
      }
    } catch (e) {
      if (e instanceof Unauthorized) {
        started = false;
        return failed(e);
      }
    }
    live(false);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// --- unit detail -------------------------------------------------------------------------------

async function openDetail(name) {
  S.selected = name;
  $('detail').hidden = false;
  $('detail-name').textContent = name;
  for (const id of ['detail-file', 'detail-status', 'detail-journal']) $(id).textContent = '…';
  $('detail-events').replaceChildren();
  const enc = encodeURIComponent(name);
  const facts = $('detail-facts');
  try {
    const u = await json(`/fleet/v1/units/${enc}`);
    facts.replaceChildren();
    for (const [k, v] of [['desired', u.desiredState], ['current', u.currentState], ['machine', machineName(u.machineID)],
      ['not placed', u.reason], ['move refused', u.moveRefused]]) {
      if (!v) continue;
      const dt = document.createElement('dt');
      dt.textContent = k;
      const dd = document.createElement('dd');
      dd.textContent = v;
      facts.append(dt, dd);
    }
    let file = '';
    let section = '';
    for (const o of u.options || []) {
      if (o.section !== section) { file += (file ? '\n' : '') + `[${o.section}]\n`; section = o.section; }
      file += `${o.name}=${o.value}\n`;
    }
    $('detail-file').textContent = file;
    const events = await json(`/fleet/v1/events?unit=${enc}&tail=50`);
    $('detail-events').replaceChildren(...(events.events || []).reverse().map((e) => eventLine(e, false)));
    if (u.currentState && u.currentState !== 'inactive') {
      const st = await json(`/fleet/v1/units/${enc}/status`).catch((e) => ({ statuses: [{ output: String(e.message) }] }));
      $('detail-status').textContent = (st.statuses || []).map((s) => s.output).join('\n') || '(no status)';
      const j = await api(`/fleet/v1/units/${enc}/journal?lines=40`).then((r) => r.text()).catch((e) => String(e.message));
      $('detail-journal').textContent = j || '(empty)';
    } else {
      $('detail-status').textContent = '(not on a machine)';
      $('detail-journal').textContent = '(not on a machine)';
    }
  } catch (e) {
    failed(e);
  }
}

$('detail-close').addEventListener('click', () => { $('detail').hidden = true; S.selected = null; });

// --- filters and start -------------------------------------------------------------------------

let filterTimer = null;
function filterChanged() {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    S.filter = { names: $('unit-filter').value.trim(), state: $('state-filter').value };
    loadUnits().catch(failed);
  }, 250);
}
$('unit-filter').addEventListener('input', filterChanged);
$('state-filter').addEventListener('change', filterChanged);

async function status() {
  try {
    const s = await json('/engine/status');
    $('live').title = `engine ${s.engineId}; leader ${s.leaderId}`;
  } catch (e) { /* shown by the other calls */ }
}

function failed(e) {
  if (e instanceof Unauthorized) showLogin(e.message);
  else console.error(e);
}

let started = false;
async function start() {
  try {
    // Pin the feed's place first, so nothing between the lists and the stream is missed.
    const recent = await json('/fleet/v1/events?tail=100');
    $('login').hidden = true;
    $('app').hidden = false;
    $('logout').hidden = !S.token;
    $('events').replaceChildren();
    (recent.events || []).forEach(showEvent);
    S.lastEventId = recent.next;
    await loadMachines();
    status();
    if (!started) {
      started = true;
      follow();
    }
    await Promise.all([loadUnits(), loadStates()]);
  } catch (e) {
    if (e instanceof Unauthorized) showLogin(S.token ? e.message : 'This engine needs to know who you are.');
    else console.error(e);
  }
}

start();

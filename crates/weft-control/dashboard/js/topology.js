// The topology: Services as boxes, calls as arrows, drawn on a canvas (a thousand
// Services and ten thousand calls stay fast where DOM nodes would not). Boxes are
// coloured by health against thresholds the operator sets; each call carries a lock
// (mutual TLS) or a broken lock (some plaintext), so a gap shows at a glance. The same
// graph is in a table below for keyboards and screen readers.

import * as api from './api.js';
import { fill, fmtMs, fmtPct, fmtRps, h, serviceLink } from './dom.js';
import { Layout } from './layout.js';

const REFRESH_MS = 5000;
const COLOURS = {
  ok: { fill: '#dcfce7', stroke: '#15803d' },
  bad: { fill: '#fee2e2', stroke: '#b91c1c' },
  idle: { fill: '#f3f4f6', stroke: '#6b7280' },
};
const layout = new Layout();

/** `ok`, `bad` or `idle` for a Service or call, against the thresholds. */
export function health(signals, thresholds) {
  if (!signals.rps || signals.successRate === null || signals.successRate === undefined) return 'idle';
  if (signals.successRate < thresholds.success) return 'bad';
  if (signals.p99Ms !== null && signals.p99Ms !== undefined && signals.p99Ms > thresholds.p99Ms) return 'bad';
  return 'ok';
}

export function mount(target, _parts, params, context) {
  const thresholds = {
    success: Number(params.get('success') || 99) / 100,
    p99Ms: Number(params.get('p99') || 1000),
  };
  const state = {
    namespace: params.get('ns') || '',
    window: params.get('window') || '1m',
    nodes: [], edges: [], byName: new Map(),
    selected: params.get('select') || null,
    view: null, settled: false, timer: null, fetching: null,
  };

  const canvas = h('canvas', { role: 'img', 'aria-label': 'Service topology', tabindex: 0, 'data-settled': 'false' });
  const side = h('aside', { class: 'side', 'aria-live': 'polite' }, h('p', { class: 'muted' }, 'Select a Service or a call.'));
  const nsSelect = h('select', { id: 'topology-namespace' }, h('option', { value: '' }, 'all namespaces'));
  const windowSelect = h('select', { id: 'topology-window' }, ['1m', '10m', '1h'].map((w) => h('option', { value: w, selected: w === state.window }, w)));
  const successInput = h('input', { id: 'topology-success', type: 'number', min: 0, max: 100, step: 0.1, value: thresholds.success * 100, size: 5 });
  const p99Input = h('input', { id: 'topology-p99', type: 'number', min: 1, step: 1, value: thresholds.p99Ms, size: 6 });
  const status = h('span', { class: 'muted', id: 'topology-status' }, 'loading…');
  const listing = h('div');
  fill(target,
    h('h1', {}, 'Topology'),
    h('div', { class: 'toolbar' },
      h('label', { for: 'topology-namespace' }, 'Namespace', nsSelect),
      h('label', { for: 'topology-window' }, 'Window', windowSelect),
      h('label', { for: 'topology-success' }, 'Healthy above %', successInput),
      h('label', { for: 'topology-p99' }, 'and p99 below ms', p99Input),
      status),
    h('div', { class: 'legend' },
      h('span', { class: 'health-ok' }, '■ healthy'), h('span', { class: 'health-bad' }, '■ failing or slow'),
      h('span', { class: 'health-idle' }, '■ no traffic'), h('span', { class: 'mark lock' }, 'mutual TLS'), h('span', { class: 'mark unlock' }, 'some plaintext')),
    h('div', { class: 'topology' }, canvas, side),
    h('details', {}, h('summary', {}, 'Services and calls as tables'), listing));

  const keepParams = () => {
    const next = new URLSearchParams();
    if (state.namespace) next.set('ns', state.namespace);
    if (state.window !== '1m') next.set('window', state.window);
    if (thresholds.success !== 0.99) next.set('success', String(+(thresholds.success * 100).toFixed(3)));
    if (thresholds.p99Ms !== 1000) next.set('p99', String(thresholds.p99Ms));
    if (state.selected) next.set('select', state.selected);
    context.setParams(next);
  };
  nsSelect.addEventListener('change', () => { state.namespace = nsSelect.value; keepParams(); refresh(true); });
  windowSelect.addEventListener('change', () => { state.window = windowSelect.value; keepParams(); refresh(false); });
  const thresholdsChanged = () => {
    thresholds.success = Number(successInput.value) / 100;
    thresholds.p99Ms = Number(p99Input.value);
    keepParams(); draw(); describe(); list();
  };
  successInput.addEventListener('change', thresholdsChanged);
  p99Input.addEventListener('change', thresholdsChanged);

  // --- drawing -------------------------------------------------------------------
  const context2d = canvas.getContext('2d');
  const view = { k: 1, x: 0, y: 0 };
  let fitted = false;

  function resize() {
    const ratio = window.devicePixelRatio || 1;
    const { width, height } = canvas.getBoundingClientRect();
    canvas.width = Math.max(1, Math.round(width * ratio));
    canvas.height = Math.max(1, Math.round(height * ratio));
  }

  function fit() {
    if (!state.nodes.length) return;
    const { width, height } = canvas.getBoundingClientRect();
    let minX = Infinity; let minY = Infinity; let maxX = -Infinity; let maxY = -Infinity;
    for (const node of state.nodes) {
      minX = Math.min(minX, node.x - node.w / 2); maxX = Math.max(maxX, node.x + node.w / 2);
      minY = Math.min(minY, node.y - node.h / 2); maxY = Math.max(maxY, node.y + node.h / 2);
    }
    // Room for the namespaces' areas and their names around the boxes.
    minX -= 20; maxX += 20; minY -= 30; maxY += 20;
    const k = Math.min(2, 0.92 * Math.min(width / (maxX - minX + 1), height / (maxY - minY + 1)));
    view.k = k;
    view.x = width / 2 - k * (minX + maxX) / 2;
    view.y = height / 2 - k * (minY + maxY) / 2;
  }

  /** Where a line from the centre of `node` towards (x, y) leaves its box. */
  function boxEdge(node, x, y) {
    const dx = x - node.x; const dy = y - node.y;
    if (!dx && !dy) return { x: node.x, y: node.y };
    const scale = Math.min(Math.abs(node.w / 2 / (dx || 1e-9)), Math.abs(node.h / 2 / (dy || 1e-9)));
    return { x: node.x + dx * scale, y: node.y + dy * scale };
  }

  function lock(x, y, closed, colour) {
    const c = context2d;
    c.save();
    c.fillStyle = '#fff'; c.strokeStyle = colour; c.lineWidth = 1.5;
    c.beginPath(); c.arc(x, y, 8, 0, 2 * Math.PI); c.fill();
    c.beginPath();
    if (closed) c.arc(x, y - 2, 3, Math.PI, 0); else c.arc(x + 3, y - 4, 3, Math.PI * 1.1, Math.PI * 0.1);
    c.stroke();
    c.fillStyle = colour; c.fillRect(x - 4, y - 1, 8, 6);
    c.restore();
  }

  function draw() {
    const ratio = window.devicePixelRatio || 1;
    const c = context2d;
    c.setTransform(1, 0, 0, 1, 0, 0);
    c.clearRect(0, 0, canvas.width, canvas.height);
    c.setTransform(ratio * view.k, 0, 0, ratio * view.k, ratio * view.x, ratio * view.y);
    const many = state.edges.length > 400 && view.k < 1.2;
    // Namespaces, when there are several: a tinted area behind their Services.
    const namespaces = new Map();
    for (const node of state.nodes) {
      const box = namespaces.get(node.namespace) || { minX: Infinity, minY: Infinity, maxX: -Infinity, maxY: -Infinity };
      box.minX = Math.min(box.minX, node.x - node.w / 2); box.maxX = Math.max(box.maxX, node.x + node.w / 2);
      box.minY = Math.min(box.minY, node.y - node.h / 2); box.maxY = Math.max(box.maxY, node.y + node.h / 2);
      namespaces.set(node.namespace, box);
    }
    if (namespaces.size > 1) {
      c.font = '11px system-ui, sans-serif';
      for (const [namespace, box] of namespaces) {
        if (!namespace) continue;
        c.fillStyle = 'rgba(29, 78, 216, 0.05)';
        c.fillRect(box.minX - 14, box.minY - 22, box.maxX - box.minX + 28, box.maxY - box.minY + 36);
        c.fillStyle = '#4a5361';
        c.fillText(namespace, box.minX - 10, box.minY - 10);
      }
    }
    c.lineWidth = 1.2 / Math.max(0.5, view.k);
    const labels = [];
    for (const edge of state.edges) {
      const from = state.nodes[edge.source]; const to = state.nodes[edge.target];
      const start = boxEdge(from, to.x, to.y); const end = boxEdge(to, from.x, from.y);
      const selected = state.selected === edge.key;
      const colour = COLOURS[health(edge, thresholds)].stroke;
      c.strokeStyle = selected ? '#f59e0b' : colour;
      c.globalAlpha = many && !selected ? 0.35 : 1;
      c.lineWidth = (selected ? 3 : 1.2) / Math.max(0.5, view.k);
      c.beginPath(); c.moveTo(start.x, start.y); c.lineTo(end.x, end.y); c.stroke();
      const angle = Math.atan2(end.y - start.y, end.x - start.x);
      c.fillStyle = c.strokeStyle;
      c.beginPath();
      c.moveTo(end.x, end.y);
      c.lineTo(end.x - 9 * Math.cos(angle - 0.4), end.y - 9 * Math.sin(angle - 0.4));
      c.lineTo(end.x - 9 * Math.cos(angle + 0.4), end.y - 9 * Math.sin(angle + 0.4));
      c.fill();
      c.globalAlpha = 1;
      if (!many || selected) labels.push({ edge, x: (start.x + end.x) / 2, y: (start.y + end.y) / 2 });
    }
    for (const node of state.nodes) {
      const colours = COLOURS[health(node, thresholds)];
      const left = node.x - node.w / 2; const top = node.y - node.h / 2;
      c.fillStyle = colours.fill; c.strokeStyle = state.selected === node.name ? '#f59e0b' : colours.stroke;
      c.lineWidth = state.selected === node.name ? 3 : 1.5;
      c.beginPath(); c.roundRect(left, top, node.w, node.h, 5); c.fill(); c.stroke();
      c.fillStyle = '#1b1f24'; c.font = '600 12px system-ui, sans-serif';
      c.fillText(node.label, left + 8, top + 14);
      c.fillStyle = '#4a5361'; c.font = '10px system-ui, sans-serif';
      c.fillText(node.namespace, left + 8, top + 27);
    }
    // How long the first picture took (bench/control-scale reads it).
    if (!state.drawn && state.nodes.length) {
      state.drawn = true;
      performance.mark('weft-topology-drawn');
    }
    // Each call's lock and figures, over everything, on a backing so they stay legible.
    c.font = '10px system-ui, sans-serif';
    for (const { edge, x, y } of labels) {
      const text = `${fmtRps(edge.rps)} rps · ${fmtPct(edge.successRate)} · ${fmtMs(edge.p99Ms)}`;
      const width = c.measureText(text).width;
      c.fillStyle = 'rgba(255, 255, 255, 0.85)';
      c.fillRect(x + 9, y - 7, width + 4, 13);
      c.fillStyle = '#1b1f24';
      c.fillText(text, x + 11, y + 3);
      if (edge.mtlsShare !== null) lock(x, y, edge.mtlsShare >= 1, edge.mtlsShare >= 1 ? '#15803d' : '#b91c1c');
    }
  }

  // --- interaction -----------------------------------------------------------------
  function at(event) {
    const rect = canvas.getBoundingClientRect();
    return { x: (event.clientX - rect.left - view.x) / view.k, y: (event.clientY - rect.top - view.y) / view.k };
  }

  function hit(point) {
    for (let i = state.nodes.length - 1; i >= 0; i--) {
      const node = state.nodes[i];
      if (Math.abs(point.x - node.x) <= node.w / 2 && Math.abs(point.y - node.y) <= node.h / 2) return node.name;
    }
    let best = null; let bestDistance = 6 / view.k;
    for (const edge of state.edges) {
      const a = state.nodes[edge.source]; const b = state.nodes[edge.target];
      const dx = b.x - a.x; const dy = b.y - a.y;
      const t = Math.max(0, Math.min(1, ((point.x - a.x) * dx + (point.y - a.y) * dy) / (dx * dx + dy * dy || 1)));
      const distance = Math.hypot(point.x - (a.x + t * dx), point.y - (a.y + t * dy));
      if (distance < bestDistance) { best = edge.key; bestDistance = distance; }
    }
    return best;
  }

  let drag = null;
  canvas.addEventListener('mousedown', (event) => { drag = { x: event.clientX, y: event.clientY, moved: false }; });
  window.addEventListener('mousemove', onMove);
  window.addEventListener('mouseup', onUp);
  function onMove(event) {
    if (!drag) return;
    const dx = event.clientX - drag.x; const dy = event.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    if (drag.moved) { view.x += dx; view.y += dy; drag.x = event.clientX; drag.y = event.clientY; draw(); }
  }
  function onUp(event) {
    if (!drag) return;
    const clicked = !drag.moved;
    drag = null;
    if (clicked && event.target === canvas) select(hit(at(event)));
  }
  canvas.addEventListener('wheel', (event) => {
    event.preventDefault();
    const rect = canvas.getBoundingClientRect();
    const px = event.clientX - rect.left; const py = event.clientY - rect.top;
    const factor = Math.exp(-event.deltaY * 0.0015);
    const k = Math.min(8, Math.max(0.05, view.k * factor));
    view.x = px - (px - view.x) * (k / view.k); view.y = py - (py - view.y) * (k / view.k); view.k = k;
    draw();
  }, { passive: false });

  function select(key) {
    state.selected = key;
    keepParams(); draw(); describe();
  }

  function describe() {
    const key = state.selected;
    const node = key && state.byName.get(key);
    const edge = key && !node && state.edges.find((e) => e.key === key);
    if (node) {
      const callers = state.edges.filter((e) => state.nodes[e.target] === node);
      const callees = state.edges.filter((e) => state.nodes[e.source] === node);
      const pick = (name) => h('button', { type: 'button', onclick: () => select(name) }, name);
      fill(side,
        h('h2', {}, serviceLink(node.name || node.label)),
        h('dl', {},
          h('dt', {}, 'health'), h('dd', { class: `health-${health(node, thresholds)}` }, health(node, thresholds)),
          h('dt', {}, 'requests/s'), h('dd', {}, fmtRps(node.rps)),
          h('dt', {}, 'success'), h('dd', {}, fmtPct(node.successRate)),
          h('dt', {}, 'p99'), h('dd', {}, fmtMs(node.p99Ms)),
          h('dt', {}, 'mutual TLS'), h('dd', {}, fmtPct(node.mtlsShare)),
          node.measuredBy ? [h('dt', {}, 'measured by'), h('dd', {}, node.measuredBy)] : null),
        h('h2', {}, `Callers (${callers.length})`),
        h('ul', {}, callers.slice(0, 50).map((e) => h('li', {}, pick(state.nodes[e.source].name)))),
        h('h2', {}, `Callees (${callees.length})`),
        h('ul', {}, callees.slice(0, 50).map((e) => h('li', {}, pick(state.nodes[e.target].name)))));
    } else if (edge) {
      const from = state.nodes[edge.source].name; const to = state.nodes[edge.target].name;
      fill(side,
        h('h2', {}, `${from} → ${to}`),
        h('dl', {},
          h('dt', {}, 'requests/s'), h('dd', {}, fmtRps(edge.rps)),
          h('dt', {}, 'success'), h('dd', {}, fmtPct(edge.successRate)),
          h('dt', {}, 'p99'), h('dd', {}, fmtMs(edge.p99Ms)),
          h('dt', {}, 'mutual TLS'), h('dd', {}, edge.mtlsShare === null ? '-' : edge.mtlsShare >= 1 ? 'every request' : `${fmtPct(edge.mtlsShare)} (the rest in plaintext)`),
          h('dt', {}, 'requests'), h('dd', {}, String(edge.requests))),
        h('p', {}, serviceLink(from), ' · ', serviceLink(to)));
    } else {
      fill(side, h('p', { class: 'muted' }, 'Select a Service or a call.'));
    }
  }

  function list() {
    const mark = (edge) => edge.mtlsShare === null ? 'no requests'
      : edge.mtlsShare >= 1 ? h('span', { class: 'mark lock' }, 'mutual TLS') : h('span', { class: 'mark unlock' }, `plaintext (${fmtPct(1 - edge.mtlsShare)})`);
    fill(listing,
      h('table', { id: 'topology-services' },
        h('thead', {}, h('tr', {}, ['Service', 'health', 'rps', 'success', 'p99'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, state.nodes.map((node) => h('tr', {
          dataset: { name: node.name, health: health(node, thresholds), x: node.x.toFixed(1), y: node.y.toFixed(1), w: node.w.toFixed(1), h: node.h.toFixed(1) },
        }, h('td', {}, serviceLink(node.name || node.label)), h('td', {}, health(node, thresholds)), h('td', { class: 'num' }, fmtRps(node.rps)),
        h('td', { class: 'num' }, fmtPct(node.successRate)), h('td', { class: 'num' }, fmtMs(node.p99Ms)))))),
      h('table', { id: 'topology-edges' },
        h('thead', {}, h('tr', {}, ['Caller', 'Callee', 'transport', 'rps', 'success', 'p99'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, state.edges.map((edge) => h('tr', {
          dataset: { source: state.nodes[edge.source].name, destination: state.nodes[edge.target].name, mtls: edge.mtlsShare === null ? 'none' : edge.mtlsShare >= 1 ? 'mtls' : 'plaintext' },
        }, h('td', {}, state.nodes[edge.source].name), h('td', {}, state.nodes[edge.target].name), h('td', {}, mark(edge)),
        h('td', { class: 'num' }, fmtRps(edge.rps)), h('td', { class: 'num' }, fmtPct(edge.successRate)), h('td', { class: 'num' }, fmtMs(edge.p99Ms)))))));
  }

  // --- data --------------------------------------------------------------------------
  function measure(name) {
    // A caller without a Service (an entry proxy, a gateway) reports none.
    const [namespace, label] = name.includes('/') ? name.split('/', 2) : ['', name || '(no Service)'];
    context2d.font = '600 12px system-ui, sans-serif';
    const width = context2d.measureText(label).width;
    context2d.font = '10px system-ui, sans-serif';
    const nsWidth = context2d.measureText(namespace).width;
    return { namespace, label, w: Math.ceil(Math.max(width, nsWidth) + 16), h: 34 };
  }

  async function refresh(relayout) {
    if (state.fetching) state.fetching.abort();
    const controller = new AbortController();
    state.fetching = controller;
    const query = new URLSearchParams({ window: state.window });
    if (state.namespace) query.set('namespace', state.namespace);
    let answer;
    try {
      answer = await api.get(`/topology?${query}`, controller.signal);
    } catch (error) {
      if (error.name !== 'AbortError') status.textContent = `could not refresh: ${error.message}`;
      return;
    } finally {
      if (state.fetching === controller) state.fetching = null;
    }
    const previous = state.byName;
    const nodes = answer.services.map((service) => {
      const known = previous.get(service.name);
      const shape = known ? { namespace: known.namespace, label: known.label, w: known.w, h: known.h } : measure(service.name);
      return { ...shape, ...service, x: known ? known.x : undefined, y: known ? known.y : undefined };
    });
    const edges = answer.edges.map(([source, target, rps, successRate, p99Ms, mtlsShare, requests]) => ({
      source, target, rps, successRate, p99Ms, mtlsShare, requests,
      key: `${answer.services[source].name}->${answer.services[target].name}`,
    }));
    const namespaces = [...new Set(answer.services.map((s) => s.name.split('/')[0]))].filter(Boolean).sort();
    if (!state.namespace) {
      const chosen = nsSelect.value;
      fill(nsSelect, h('option', { value: '' }, 'all namespaces'), namespaces.map((ns) => h('option', { value: ns, selected: ns === chosen }, ns)));
    }
    state.nodes = nodes; state.edges = edges;
    state.byName = new Map(nodes.map((node) => [node.name, node]));
    const changed = relayout || nodes.some((node) => node.x === undefined) || nodes.length !== previous.size;
    status.textContent = `${nodes.length} Services, ${edges.length} calls · window ${answer.window} · updated ${new Date().toLocaleTimeString()}`;
    canvas.setAttribute('aria-label', `Service topology: ${nodes.length} Services and ${edges.length} calls`);
    if (changed) {
      state.settled = false;
      canvas.dataset.settled = 'false';
      layout.place(nodes, edges, {
        onFrame: () => { if (!fitted) fit(); draw(); },
        onSettled: () => {
          if (!fitted || relayout) { fit(); fitted = true; }
          state.settled = true;
          canvas.dataset.settled = 'true';
          if (!performance.getEntriesByName('weft-topology-settled').length) performance.mark('weft-topology-settled');
          draw(); list();
        },
      });
    } else {
      draw(); list();
    }
    describe();
  }

  resize();
  const onResize = () => { resize(); draw(); };
  window.addEventListener('resize', onResize);
  refresh(false);
  state.timer = setInterval(() => refresh(false), REFRESH_MS);
  return () => {
    clearInterval(state.timer);
    if (state.fetching) state.fetching.abort();
    layout.stop();
    window.removeEventListener('resize', onResize);
    window.removeEventListener('mousemove', onMove);
    window.removeEventListener('mouseup', onUp);
  };
}

// A Service: its golden signals over a window, its routes with the configured and the
// observed split, its endpoints as the callers' balancers see them, its policies with
// what each allowed and denied, its callers and callees, and the changes made to it in
// the window. Without a Service named, the list of every Service.

import * as api from './api.js';
import { fill, fmtMs, fmtPct, fmtRps, fmtTime, h, num, serviceLink, table } from './dom.js';
import { changesOf, lineDiff } from './changes.js';

const REFRESH_MS = 5000;

function goldenCells(row) {
  return [num(fmtRps(row.rps)), num(fmtPct(row.successRate)), num(fmtMs(row.p50Ms)), num(fmtMs(row.p95Ms)), num(fmtMs(row.p99Ms))];
}
const GOLDEN = ['rps', 'success', 'p50', 'p95', 'p99'];

/** A call's transport, marked as the topology marks it. */
function transport(row) {
  return row.mtls ? h('span', { class: 'mark lock' }, 'mutual TLS') : h('span', { class: 'mark unlock' }, 'plaintext');
}

export function mount(target, parts, params, context) {
  const windowLength = params.get('window') || '10m';
  const [namespace, name] = parts;
  const windowSelect = h('select', { id: 'service-window' }, ['1m', '10m', '1h'].map((w) => h('option', { value: w, selected: w === windowLength }, w)));
  windowSelect.addEventListener('change', () => {
    const next = new URLSearchParams(params);
    next.set('window', windowSelect.value);
    location.hash = `#/service${namespace ? `/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}` : ''}?${next}`;
  });
  const charts = h('div', { class: 'charts', id: 'service-charts' });
  const changes = h('div', { id: 'service-changes' });
  const compare = h('div', { id: 'service-compare', 'aria-live': 'polite' });
  const body = h('div', {}, h('p', { class: 'muted' }, 'loading…'));
  fill(target,
    h('h1', {}, name ? `Service ${namespace}/${name}` : 'Services'),
    h('div', { class: 'toolbar' }, h('label', { for: 'service-window' }, 'Window', windowSelect)),
    name ? [charts, changes, compare] : null,
    body);
  const controller = new AbortController();
  const view = { namespace, name, windowLength, signal: controller.signal, admin: context.session.operator.role === 'admin', selected: params.get('change'), params, context };
  const load = name ? async () => { await drawCharts(charts, changes, compare, view); await one(body, namespace, name, windowLength, controller.signal); }
    : () => all(body, windowLength, controller.signal);
  load();
  const timer = setInterval(load, REFRESH_MS);
  return () => { clearInterval(timer); controller.abort(); };
}

/** The Service's golden signals per slot, with a marker at every change to it. */
async function drawCharts(charts, changesBox, compare, view) {
  const { namespace, name, windowLength, signal } = view;
  let answer; let history;
  try {
    [answer, history] = await Promise.all([
      api.get(`/stat/services?namespace=${encodeURIComponent(namespace)}&name=${encodeURIComponent(name)}&window=${windowLength}&series=true`, signal),
      api.get('/history?limit=1000&output=yaml', signal),
    ]);
  } catch (error) {
    if (error.name !== 'AbortError') fill(charts, h('p', { class: 'error' }, error.message));
    return;
  }
  const points = answer.series || [];
  const xs = points.map((p) => p.from);
  const pick = (field, scale = 1) => points.map((p) => (p.rows[0] && p.rows[0][field] !== null && p.rows[0][field] !== undefined ? p.rows[0][field] * scale : null));
  const since = points.length ? points[0].from : 0;
  const changes = changesOf(history.items, namespace, name).filter((entry) => entry.time >= since);
  const markers = changes.map((entry) => entry.time);
  const drawMarkers = (u) => {
    const c = u.ctx;
    c.save();
    c.strokeStyle = '#a16207'; c.lineWidth = 2 * devicePixelRatio; c.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
    for (const at of markers) {
      const x = u.valToPos(at, 'x', true);
      c.beginPath(); c.moveTo(x, u.bbox.top); c.lineTo(x, u.bbox.top + u.bbox.height); c.stroke();
    }
    c.restore();
  };
  const chart = (title, series, data) => {
    const box = h('div', { class: 'chart', dataset: { points: String(data[0].filter((v) => v !== null && v > 0).length) } });
    charts.append(box);
    if (!window.uPlot) { box.append(h('p', { class: 'error' }, 'The chart library did not load.')); return; }
    // As wide as a column of the grid (charts of at least 380 px, 12 px apart).
    const columns = Math.max(1, Math.min(3, Math.floor((charts.clientWidth + 12) / 392)));
    const width = Math.max(280, Math.floor((charts.clientWidth - 12 * (columns - 1)) / columns) - 18);
    new window.uPlot({ title, width, height: 180, scales: { x: { time: true } }, series: [{}, ...series], hooks: { draw: [drawMarkers] } }, [xs, ...data], box);
  };
  charts.replaceChildren();
  chart('Requests/s', [{ label: 'rps', stroke: '#1d4ed8', width: 2 }], [pick('rps')]);
  chart('Success rate (%)', [{ label: 'success', stroke: '#15803d', width: 2 }], [pick('successRate', 100)]);
  chart('Latency (ms)', [{ label: 'p50', stroke: '#1d4ed8' }, { label: 'p95', stroke: '#a16207' }, { label: 'p99', stroke: '#b91c1c', width: 2 }],
    [pick('p50Ms'), pick('p95Ms'), pick('p99Ms')]);
  fill(changesBox,
    h('h2', {}, `Changes to this Service, its routes and policies (last ${answer.window})`),
    changes.length ? h('ul', {}, changes.map((entry) => h('li', {},
      h('button', { type: 'button', class: 'marker', dataset: { revision: String(entry.revision) }, onclick: () => showChange(compare, view, entry) },
        `revision ${entry.revision}: ${entry.action} ${entry.subject.kind} ${entry.subject.namespace}/${entry.subject.name} by ${entry.operator.name}, ${fmtTime(entry.time)}`))))
      : h('p', { class: 'muted' }, 'None in this window.'));
  if (view.selected && !compare.dataset.shown) {
    const entry = changes.find((e) => String(e.revision) === view.selected);
    if (entry) showChange(compare, view, entry);
  }
}

/** One change: the signals before and after it, its YAML diff, and (admin) a revert. */
async function showChange(compare, view, entry) {
  const { namespace, name, signal } = view;
  compare.dataset.shown = String(entry.revision);
  const next = new URLSearchParams(view.params);
  next.set('change', String(entry.revision));
  view.context.setParams(next);
  let around = null;
  try {
    around = await api.get(`/stat/services?namespace=${encodeURIComponent(namespace)}&name=${encodeURIComponent(name)}&window=1m&aroundRevision=${entry.revision}`, signal);
  } catch (error) {
    around = { error: error.message };
  }
  const row = (window) => (window && window.rows && window.rows[0]) || {};
  const result = h('p', { id: 'revert-result', role: 'status' });
  const revert = view.admin ? h('button', { type: 'button', class: 'primary', id: 'revert', onclick: async () => {
    try {
      const report = await api.change('POST', '/revert', { revision: entry.revision });
      result.className = 'health-ok';
      result.textContent = `Reverted: store revision ${report.revision} (${report.results.map((r) => `${r.kind} ${r.namespace}/${r.name} ${r.action}`).join(', ')}).`;
    } catch (error) {
      result.className = 'error';
      result.textContent = error.message;
    }
  } }, `Revert revision ${entry.revision}`) : h('p', { class: 'muted' }, 'Reverting needs an admin token.');
  fill(compare,
    h('h2', {}, `Revision ${entry.revision}: ${entry.action} ${entry.subject.kind} ${entry.subject.namespace}/${entry.subject.name}`),
    around.error ? h('p', { class: 'muted' }, `No before/after comparison: ${around.error}`)
      : table(['', 'rps', 'success', 'p50', 'p95', 'p99'], [
        ['1 min before', ...goldenCells(row(around.before))],
        ['1 min after', ...goldenCells(row(around.after))]], { id: 'change-compare' }),
    h('pre', { class: 'diff', id: 'change-diff' }, lineDiff(entry.beforeYaml || '', entry.afterYaml || '').map(([mark, line]) =>
      h('span', { class: mark === '+' ? 'added' : mark === '-' ? 'removed' : null }, `${mark} ${line}\n`))),
    revert, result);
}

async function all(body, windowLength, signal) {
  try {
    const answer = await api.get(`/stat/services?window=${windowLength}`, signal);
    fill(body, table(['Service', ...GOLDEN, 'mutual TLS', 'measured by'],
      answer.rows.map((row) => [serviceLink(`${row.namespace}/${row.name}`), ...goldenCells(row), num(fmtPct(row.mtlsShare)), row.measuredBy || '']),
      { id: 'services' }));
  } catch (error) {
    if (error.name !== 'AbortError') fill(body, h('p', { class: 'error' }, error.message));
  }
}

async function one(body, namespace, name, windowLength, signal) {
  const query = `namespace=${encodeURIComponent(namespace)}&name=${encodeURIComponent(name)}&window=${windowLength}`;
  let answers;
  try {
    answers = await Promise.all([
      api.get(`/stat/services?${query}`, signal),
      api.get(`/stat/routes?${query}`, signal),
      api.get(`/stat/endpoints?${query}`, signal),
      api.get(`/stat/authz?${query}`, signal),
      api.get(`/stat/edges?${query}`, signal),
      api.get(`/services/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}/describe`, signal),
    ]);
  } catch (error) {
    if (error.name !== 'AbortError') fill(body, h('p', { class: 'error' }, error.message));
    return;
  }
  const [services, routes, endpoints, authz, edges, { service: described }] = answers;
  // The configured split, from the routes themselves: `ns/name#rule` → backend → share.
  const configured = new Map();
  await Promise.all(described.routes.map(async (text) => {
    const [kind, qualifiedRoute] = text.split(' ');
    const [routeNamespace, routeName] = qualifiedRoute.split('/');
    try {
      const item = await api.get(`/resources/${kind}/${encodeURIComponent(routeNamespace)}/${encodeURIComponent(routeName)}`, signal);
      (item.document.spec.rules || []).forEach((rule, index) => {
        const refs = rule.backendRefs || [];
        const total = refs.reduce((sum, ref) => sum + (ref.weight ?? 1), 0);
        const shares = new Map(refs.map((ref) => [`${ref.namespace || routeNamespace}/${ref.name}`, total ? (ref.weight ?? 1) / total : 0]));
        configured.set(`${qualifiedRoute}#${index}`, shares);
      });
    } catch (_) { /* a route that went away between the two calls: no configured split */ }
  }));
  const qualified = `${namespace}/${name}`;
  const summary = services.rows[0];
  const callers = edges.rows.filter((row) => row.destination.service === qualified);
  const callees = edges.rows.filter((row) => row.source.service === qualified);
  fill(body,
    h('h2', {}, `Golden signals (last ${services.window})`),
    summary ? table(GOLDEN.concat(['requests', 'mutual TLS']), [[...goldenCells(summary), num(String(summary.requests)), num(fmtPct(summary.mtlsShare))]], { id: 'service-golden' })
      : h('p', { class: 'muted' }, 'No requests in this window.'),
    h('h2', {}, 'Routes'),
    routes.rows.length ? table(['route', 'backend', 'configured split', 'observed split', 'requests', 'tries', ...GOLDEN],
      routes.rows.flatMap((route) => [[h('strong', {}, route.route || '(the Service itself)'), '', '', '', num(String(route.requests)), num(String(route.tries)), ...goldenCells(route)],
        ...(route.backends || []).map((backend) => {
          const share = configured.get(route.route)?.get(backend.backend);
          return ['', backend.backend, num(share === undefined ? '-' : fmtPct(share)), num(fmtPct(backend.share)),
            num(String(backend.requests)), num(String(backend.tries.requests)), ...goldenCells(backend)];
        })]), { id: 'service-routes' })
      : h('p', { class: 'muted' }, described.routes.length ? `Attached: ${described.routes.join(', ')} (no requests in this window)` : 'No routes attached: requests go to the Service itself.'),
    h('h2', {}, 'Endpoints'),
    table(['address', 'port', 'workload', 'zone', 'weight', 'health', 'latency estimate', 'in flight', 'ejected for', 'reported by'],
      described.endpoints.map((endpoint) => {
        const seen = endpoints.rows.filter((row) => row.address === endpoint.address && row.port === endpoint.port);
        const latest = seen.sort((a, b) => b.reportedAt - a.reportedAt)[0];
        return [endpoint.address, num(String(endpoint.port)),
          endpoint.workload ? h('a', { href: `#/workload/${encodeURIComponent(namespace)}/${encodeURIComponent(endpoint.workload)}` }, endpoint.workload) : '', endpoint.zone || '', num(String(endpoint.weight ?? '')), endpoint.health,
          num(latest ? fmtMs(latest.latencyEstimateMs) : '-'), num(latest ? String(latest.inFlight) : '-'),
          num(latest && latest.ejectedForMs ? `${(latest.ejectedForMs / 1000).toFixed(1)} s` : '-'), latest ? latest.reporter : ''];
      }), { id: 'service-endpoints' }),
    h('h2', {}, 'Policies'),
    authz.rows.length ? table(['policy', 'allowed', 'denied'], authz.rows.map((row) => [row.policy || '(no policy decided: allowed by default)', num(String(row.allowed)), num(String(row.denied))]), { id: 'service-authz' })
      : h('p', { class: 'muted' }, 'No authorization decisions in this window.'),
    h('h2', {}, 'Callers'),
    table(['caller', 'identity', 'served by', ...GOLDEN, 'transport'], callers.map((row) => [serviceLink(row.source.service), row.source.identity || '(none)', row.destination.identity || '(none)', ...goldenCells(row), transport(row)])),
    h('h2', {}, 'Callees'),
    table(['callee', 'identity', ...GOLDEN, 'transport'], callees.map((row) => [serviceLink(row.destination.service), row.destination.identity || '(none)', ...goldenCells(row), transport(row)])),
    described.unresolved.length ? [h('h2', {}, 'Unresolved references'), h('ul', {}, described.unresolved.map((text) => h('li', { class: 'error' }, text)))] : null);
}

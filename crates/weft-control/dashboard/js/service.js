// A Service: its golden signals over a window, its routes with the configured and the
// observed split, its endpoints as the callers' balancers see them, its policies with
// what each allowed and denied, its callers and callees, and the changes made to it in
// the window. Without a Service named, the list of every Service.

import * as api from './api.js';
import { fill, fmtMs, fmtPct, fmtRps, fmtTime, h, num, serviceLink, table } from './dom.js';

const REFRESH_MS = 5000;

function goldenCells(row) {
  return [num(fmtRps(row.rps)), num(fmtPct(row.successRate)), num(fmtMs(row.p50Ms)), num(fmtMs(row.p95Ms)), num(fmtMs(row.p99Ms))];
}
const GOLDEN = ['rps', 'success', 'p50', 'p95', 'p99'];

export function mount(target, parts, params, context) {
  const windowLength = params.get('window') || '10m';
  const [namespace, name] = parts;
  const windowSelect = h('select', { id: 'service-window' }, ['1m', '10m', '1h'].map((w) => h('option', { value: w, selected: w === windowLength }, w)));
  windowSelect.addEventListener('change', () => {
    const next = new URLSearchParams(params);
    next.set('window', windowSelect.value);
    location.hash = `#/service${namespace ? `/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}` : ''}?${next}`;
  });
  const body = h('div', { 'aria-live': 'polite' }, h('p', { class: 'muted' }, 'loading…'));
  fill(target,
    h('h1', {}, name ? `Service ${namespace}/${name}` : 'Services'),
    h('div', { class: 'toolbar' }, h('label', { for: 'service-window' }, 'Window', windowSelect)),
    body);
  const controller = new AbortController();
  const load = name ? () => one(body, namespace, name, windowLength, controller.signal) : () => all(body, windowLength, controller.signal);
  load();
  const timer = setInterval(load, REFRESH_MS);
  return () => { clearInterval(timer); controller.abort(); };
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
  const changes = services.changes.filter((change) => change.namespace === namespace);
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
        return [endpoint.address, num(String(endpoint.port)), endpoint.workload || '', endpoint.zone || '', num(String(endpoint.weight ?? '')), endpoint.health,
          num(latest ? fmtMs(latest.latencyEstimateMs) : '-'), num(latest ? String(latest.inFlight) : '-'),
          num(latest && latest.ejectedForMs ? `${(latest.ejectedForMs / 1000).toFixed(1)} s` : '-'), latest ? latest.reporter : ''];
      }), { id: 'service-endpoints' }),
    h('h2', {}, 'Policies'),
    authz.rows.length ? table(['policy', 'allowed', 'denied'], authz.rows.map((row) => [row.policy, num(String(row.allowed)), num(String(row.denied))]), { id: 'service-authz' })
      : h('p', { class: 'muted' }, 'No authorization decisions in this window.'),
    h('h2', {}, 'Callers'),
    table(['caller', 'identity', ...GOLDEN, 'mutual TLS'], callers.map((row) => [serviceLink(row.source.service), row.source.identity || '(none)', ...goldenCells(row), row.mtls ? '🔒 yes' : '🔓 no'])),
    h('h2', {}, 'Callees'),
    table(['callee', 'identity', ...GOLDEN, 'mutual TLS'], callees.map((row) => [serviceLink(row.destination.service), row.destination.identity || '(none)', ...goldenCells(row), row.mtls ? '🔒 yes' : '🔓 no'])),
    h('h2', {}, `Changes in this namespace (last ${services.window})`),
    changes.length ? table(['time', 'revision', 'change', 'resource', 'by'], changes.map((change) => [fmtTime(change.time), num(String(change.revision)), change.action,
      `${change.kind} ${change.namespace}/${change.name}`, change.by]), { id: 'service-changes' })
      : h('p', { class: 'muted' }, 'None.'),
    described.unresolved.length ? [h('h2', {}, 'Unresolved references'), h('ul', {}, described.unresolved.map((text) => h('li', { class: 'error' }, text)))] : null);
}

// Live tap: requests through the proxies of a Service or workload, streamed as they
// happen (the API's JSON lines, read with a streaming fetch under the session), with
// filters, bounded by the session's rate. Click a request for why the mesh did what it
// did: the route, the backend and endpoint chosen, each try, the authorization verdict.

import * as api from './api.js';
import { fill, fmtMs, h } from './dom.js';

const MOST_ROWS = 500;

export function mount(target, _parts, params, context) {
  const field = (id, label, value, attributes = {}) => {
    const input = h('input', { id, value: value || '', ...attributes });
    return [input, h('label', { for: id }, label, input)];
  };
  const [service, serviceLabel] = field('tap-service', 'Service', params.get('service'), { placeholder: 'namespace/name', size: 20 });
  const [method, methodLabel] = field('tap-method', 'Method', params.get('method'), { size: 6 });
  const [pathPrefix, pathLabel] = field('tap-path', 'Path prefix', params.get('pathPrefix'), { size: 12 });
  const [status, statusLabel] = field('tap-status', 'Status', params.get('status'), { placeholder: '503 or 5xx', size: 6 });
  const [route, routeLabel] = field('tap-route', 'Route', params.get('route'), { size: 12 });
  const [maxRps, rpsLabel] = field('tap-max-rps', 'Max requests/s', params.get('maxRps') || '100', { type: 'number', min: 1, max: 1000, size: 5 });
  const start = h('button', { type: 'button', id: 'tap-start', class: 'primary' }, 'Start');
  const stop = h('button', { type: 'button', id: 'tap-stop', disabled: true }, 'Stop');
  const state = h('span', { class: 'muted', id: 'tap-state', role: 'status' }, 'Not tapping.');
  const rows = h('tbody');
  const detail = h('aside', { class: 'side', id: 'tap-detail', 'aria-live': 'polite' }, h('p', { class: 'muted' }, 'Click a request for why.'));
  fill(target,
    h('h1', {}, 'Live tap'),
    h('div', { class: 'toolbar' }, serviceLabel, methodLabel, pathLabel, statusLabel, routeLabel, rpsLabel, start, stop, state),
    h('div', { class: 'topology' },
      h('table', { class: 'tap-table', id: 'tap-requests' },
        h('thead', {}, h('tr', {}, ['time', 'direction', 'from', 'to', 'method', 'path', 'status', 'latency', 'route', 'authz'].map((t) => h('th', { scope: 'col' }, t)))),
        rows),
      detail));

  let controller = null;
  let count = 0;

  function why(event) {
    const w = event.why;
    fill(detail,
      h('h2', {}, `${event.method} ${event.authority}${event.path}`),
      h('dl', {},
        h('dt', {}, 'status'), h('dd', {}, String(event.status), event.error ? ` (weft-error: ${event.error})` : ''),
        h('dt', {}, 'from'), h('dd', {}, event.source.identity || event.source.service || '(unknown)'),
        h('dt', {}, 'to'), h('dd', {}, event.destination.identity || event.destination.service || ''),
        h('dt', {}, 'route'), h('dd', {}, w.route || '(none)', w.httpRoute ? ` (${w.httpRoute})` : ''),
        h('dt', {}, 'backend'), h('dd', {}, w.backend || '', w.totalWeight ? ` (weight ${w.backendWeight} of ${w.totalWeight})` : ''),
        h('dt', {}, 'endpoint'), h('dd', {}, w.endpoint || ''),
        h('dt', {}, 'authorization'), h('dd', { id: 'tap-authz' }, w.authz ? `${w.authz.verdict}${w.authz.policy ? ` by ${w.authz.policy}` : ''}` : '-'),
        h('dt', {}, 'trace id'), h('dd', {}, h('code', {}, event.traceId || '-')),
        h('dt', {}, 'latency'), h('dd', {}, fmtMs(event.durationMs)),
        h('dt', {}, 'mutual TLS'), h('dd', {}, event.tls ? 'yes' : 'no')),
      w.tries.length ? [h('h2', {}, 'Tries'), h('ol', {}, w.tries.map((t) => h('li', {},
        `${t.endpoint || '?'} (estimate ${fmtMs(t.estimateMs)}, ${t.inFlight} in flight${t.skippedEjected ? `, skipped ${t.skippedEjected} ejected` : ''}): `,
        t.status ? String(t.status) : t.error || '', ` → ${t.then}`, t.budgetLeft !== null ? ` (retry budget left ${t.budgetLeft})` : '',
        t.ejectedMs ? ` · ejected for ${t.ejectedMs} ms` : '')))] : null);
  }

  function add(event) {
    count++;
    const row = h('tr', { tabindex: 0, dataset: { status: event.status, authz: event.why.authz ? event.why.authz.verdict : '' } },
      h('td', {}, event.time.slice(11, 23)), h('td', {}, event.direction),
      h('td', {}, event.source.service || event.source.identity || ''), h('td', {}, event.destination.service || ''),
      h('td', {}, event.method), h('td', {}, event.path), h('td', { class: event.status >= 500 || event.status === 403 ? 'health-bad' : null }, String(event.status)),
      h('td', { class: 'num' }, fmtMs(event.durationMs)), h('td', {}, event.why.route || ''),
      h('td', {}, event.why.authz ? `${event.why.authz.verdict}${event.why.authz.policy ? ` (${event.why.authz.policy})` : ''}` : ''));
    const choose = () => {
      for (const other of rows.querySelectorAll('[aria-selected]')) other.removeAttribute('aria-selected');
      row.setAttribute('aria-selected', 'true');
      why(event);
    };
    row.addEventListener('click', choose);
    row.addEventListener('keydown', (key) => { if (key.key === 'Enter') choose(); });
    rows.prepend(row);
    while (rows.children.length > MOST_ROWS) rows.lastElementChild.remove();
  }

  async function run() {
    const query = new URLSearchParams();
    const target = service.value.trim();
    if (!target) { state.textContent = 'Name a Service (namespace/name) to tap.'; return; }
    if (target.startsWith('workload/')) query.set('workload', target.slice('workload/'.length)); else query.set('service', target);
    if (method.value) query.set('method', method.value.trim().toUpperCase());
    if (pathPrefix.value) query.set('pathPrefix', pathPrefix.value.trim());
    if (status.value) query.set('status', status.value.trim());
    if (route.value) query.set('route', route.value.trim());
    if (maxRps.value) query.set('maxRps', maxRps.value);
    context.setParams(query);
    controller = new AbortController();
    start.disabled = true; stop.disabled = false; count = 0;
    state.textContent = 'Starting…';
    try {
      await api.stream(`/tap?${query}`, (line) => {
        if (line.tapping) state.textContent = `Tapping ${target}…`;
        if (line.event) { add(line.event); state.textContent = `Tapping ${target}: ${count} requests`; }
        if (line.notice) state.textContent = `${state.textContent} (${line.notice.message || JSON.stringify(line.notice)})`;
      }, controller.signal);
      state.textContent = `Tap ended: ${count} requests.`;
    } catch (error) {
      state.textContent = error.name === 'AbortError' ? `Stopped: ${count} requests.` : `Tap refused: ${error.message}`;
    } finally {
      start.disabled = false; stop.disabled = true; controller = null;
    }
  }
  start.addEventListener('click', run);
  stop.addEventListener('click', () => controller && controller.abort());
  if (params.get('service') && params.get('start') === '1') run();
  return () => controller && controller.abort();
}

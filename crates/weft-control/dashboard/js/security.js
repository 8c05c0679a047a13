// Security: which identity may call which Service (the authorization matrix the
// control plane computes from the policies), each Service's mutual-TLS mode, the calls
// that carried plaintext, the certificates that expire soon, and revoked identities.

import * as api from './api.js';
import { fill, fmtPct, fmtTime, h, num, serviceLink, table } from './dom.js';
import { countdown } from './mesh.js';

const SOON_SECONDS = 24 * 3600;

function cell(reach) {
  if (reach.reach === 'all') return h('td', { class: 'health-ok', title: reach.policy || 'allowed by default' }, `✔ all${reach.policy ? ` (${reach.policy})` : ''}`);
  if (reach.reach === 'none') return h('td', { class: 'health-bad', title: reach.policy }, `✘ none (${reach.policy})`);
  return h('td', { class: 'health-idle', title: `allow: ${reach.allow.join(', ')}; deny: ${reach.deny.join(', ')}` },
    `◐ some (${[...reach.allow, ...reach.deny].join(', ')})`);
}

export function mount(target, _parts, params, context) {
  const namespace = params.get('ns') || '';
  const nsInput = h('input', { id: 'security-namespace', value: namespace, placeholder: 'every namespace', size: 16 });
  nsInput.addEventListener('change', () => {
    const next = new URLSearchParams();
    if (nsInput.value) next.set('ns', nsInput.value);
    context.setParams(next);
    load();
  });
  const body = h('div', {}, h('p', { class: 'muted' }, 'loading…'));
  fill(target, h('h1', {}, 'Security'), h('div', { class: 'toolbar' }, h('label', { for: 'security-namespace' }, 'Namespace', nsInput)), body);
  const controller = new AbortController();
  async function load() {
    const query = nsInput.value ? `?namespace=${encodeURIComponent(nsInput.value)}` : '';
    try {
      const [{ matrix }, edges, proxies, revocations] = await Promise.all([
        api.get(`/authz/matrix${query}`, controller.signal),
        api.get(`/stat/edges${query}${query ? '&' : '?'}window=10m`, controller.signal),
        api.get('/proxies', controller.signal),
        api.get('/revocations', controller.signal),
      ]);
      const plaintext = edges.rows.filter((row) => row.mtlsShare !== null && row.mtlsShare < 1);
      const now = Date.now() / 1000;
      const expiring = proxies.items.filter((p) => p.certificate && p.certificate.notAfter - now < SOON_SECONDS);
      const revoked = revocations.items;
      fill(body,
        h('h2', {}, 'Who may call what'),
        h('p', { class: 'muted' }, 'Computed by the control plane from every AuthorizationPolicy (weft authz matrix). "some": only some methods, paths, ports or headers.'),
        h('div', {}, h('table', { id: 'authz-matrix' },
          h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Service'), h('th', { scope: 'col' }, 'mTLS mode'),
            matrix.identities.map((identity) => h('th', { scope: 'col' }, identity || 'plaintext caller')))),
          h('tbody', {}, matrix.services.map((row) => h('tr', { dataset: { service: `${row.namespace}/${row.name}` } },
            h('th', { scope: 'row' }, serviceLink(`${row.namespace}/${row.name}`)), h('td', {}, row.mtls), row.cells.map(cell)))))),
        h('h2', {}, `Calls with plaintext (last 10 min): ${plaintext.length}`),
        plaintext.length ? table(['caller', 'callee', 'mutual TLS share'], plaintext.map((row) => [row.source.service, serviceLink(row.destination.service), num(fmtPct(row.mtlsShare))]), { id: 'plaintext-edges' })
          : h('p', { class: 'health-ok' }, 'Every call in the window was over mutual TLS.'),
        h('h2', {}, `Certificates expiring within a day: ${expiring.length}`),
        expiring.length ? table(['proxy', 'identity', 'serial', 'expires in'], expiring.map((p) => [p.proxyId, p.identity || '', h('code', {}, p.certificate.serial.slice(0, 16)), countdown(p.certificate.notAfter)])) : null,
        h('h2', {}, `Revocations: ${revoked.length}`),
        revoked.length ? table(['id', 'what', 'revoked', 'by'], revoked.map((r) => [r.id, `${r.kind} ${r.value}`, fmtTime(r.createdAt), r.by]), { id: 'revocations' }) : null);
    } catch (error) {
      if (error.name !== 'AbortError') fill(body, h('p', { class: 'error' }, error.message));
    }
  }
  load();
  const timer = setInterval(load, 10000);
  return () => { clearInterval(timer); controller.abort(); };
}

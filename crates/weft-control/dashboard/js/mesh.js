// The mesh itself: the control plane's replicas and leader, its store and CA, what
// `weft check` finds, and every connected proxy with the configuration version it applied, its last refusal
// (NACK) and its certificate's expiry as a countdown.

import * as api from './api.js';
import { fill, fmtTime, h, num, table } from './dom.js';

const REFRESH_MS = 5000;

export function countdown(notAfter) {
  const left = notAfter - Date.now() / 1000;
  if (left <= 0) return 'expired';
  const hours = Math.floor(left / 3600); const minutes = Math.floor((left % 3600) / 60);
  return hours >= 48 ? `${Math.floor(hours / 24)} d` : hours ? `${hours} h ${minutes} min` : `${minutes} min ${Math.floor(left % 60)} s`;
}

/** What `weft check` finds in the proxies' answer: the same rules, the same words. */
export function findings(proxies) {
  const now = Date.now() / 1000;
  const found = [];
  for (const p of proxies.items) {
    const name = `${p.namespace}/${p.proxyId}`;
    if (!p.identity) { found.push(`${name}: no workload identity (its traffic cannot use mutual TLS)`); continue; }
    const c = p.certificate;
    if (!c) continue;
    const life = Math.max(1, c.notAfter - c.received);
    if (c.notAfter <= now) found.push(`${name}: certificate ${c.serial} expired`);
    // Proxies renew at ~70% of the life: under 20% left means renewal is failing.
    else if ((c.notAfter - now) * 5 < life) found.push(`${name}: certificate ${c.serial} expires in ${countdown(c.notAfter)} and has not been renewed; see that proxy's log`);
  }
  for (const r of proxies.unreachableReplicas || []) found.push(`control-plane replica ${r.replica} did not answer; its proxies were not checked`);
  return found;
}

export function mount(target) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'loading…'));
  fill(target, h('h1', {}, 'The mesh'), body);
  const controller = new AbortController();
  const load = async () => {
    try {
      const [status, proxies] = await Promise.all([api.get('/status', controller.signal), api.get('/proxies', controller.signal)]);
      fill(body,
        h('h2', {}, 'Control plane'),
        table(['version', 'store', 'store revision', 'trust domain', 'CA root', 'this replica', 'leader here'],
          [[status.version, status.store, num(String(status.revision)), status.trustDomain, h('code', {}, status.caRoot.slice(0, 16)), status.replica, status.leader ? 'yes' : 'no']], { id: 'mesh-status' }),
        h('h2', {}, 'weft check'),
        (() => {
          const found = findings(proxies);
          return found.length ? h('ul', { id: 'mesh-findings' }, found.map((f) => h('li', { class: 'error' }, f)))
            : h('p', { class: 'health-ok', id: 'mesh-findings' }, `ok: ${proxies.items.length} proxies, every one with a current workload certificate`);
        })(),
        h('h2', {}, `Replicas (${status.replicas.length})`),
        table(['replica', 'API', 'gRPC', 'started'], status.replicas.map((r) => [r.id, r.api, r.grpc, fmtTime(r.startedAt ?? r.started_at)]), { id: 'mesh-replicas' }),
        h('h2', {}, `Proxies (${proxies.items.length})`),
        table(['proxy', 'namespace', 'Service', 'identity', 'replica', 'version applied', 'last NACK', 'certificate serial', 'expires in'],
          proxies.items.map((p) => [
            h('a', { href: `#/workload/${encodeURIComponent(p.namespace)}/${encodeURIComponent(p.proxyId)}` }, p.proxyId),
            p.namespace, p.service || '', p.identity || '', p.controlPlane, p.appliedVersion,
            p.lastNack ? h('span', { class: 'error' }, p.lastNack) : '',
            p.certificate ? h('code', {}, p.certificate.serial.slice(0, 16)) : '',
            p.certificate ? countdown(p.certificate.notAfter) : '']), { id: 'mesh-proxies' }),
        (proxies.unreachableReplicas || []).length ? h('p', { class: 'error' }, `Replicas that did not answer: ${proxies.unreachableReplicas.map((r) => r.replica).join(', ')}`) : null,
        h('p', { class: 'muted' }, `Updated ${fmtTime(Date.now() / 1000)}`));
    } catch (error) {
      if (error.name !== 'AbortError') fill(body, h('p', { class: 'error' }, error.message));
    }
  };
  load();
  const timer = setInterval(load, REFRESH_MS);
  return () => { clearInterval(timer); controller.abort(); };
}

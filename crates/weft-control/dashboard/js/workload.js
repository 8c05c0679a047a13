// A workload and its proxy: identity and certificate (serial, issuer, expiry counting
// down), the configuration version sent and applied, the last refusal (NACK), and the
// configuration it runs, as the control plane sends it.

import * as api from './api.js';
import { fill, fmtTime, h, serviceLink } from './dom.js';
import { countdown } from './mesh.js';

export function mount(target, parts) {
  const [namespace, name] = parts;
  const body = h('div', {}, h('p', { class: 'muted' }, 'loading…'));
  fill(target, h('h1', {}, `Workload ${namespace}/${name}`), body);
  const controller = new AbortController();
  let expiry = null;
  const expires = h('span', { id: 'workload-expires' });
  const load = async () => {
    let answer;
    try {
      answer = await api.get(`/workloads/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}/describe`, controller.signal);
    } catch (error) {
      if (error.name !== 'AbortError') fill(body, h('p', { class: 'error' }, error.message));
      return;
    }
    const w = answer.workload;
    const registration = w.registration || {};
    const proxy = w.proxy || {};
    const certificate = proxy.certificate;
    const configuration = w.configuration;
    expiry = certificate ? certificate.notAfter : null;
    const row = (label, ...value) => [h('dt', {}, label), h('dd', {}, ...value)];
    fill(body,
      h('dl', { class: 'facts', id: 'workload-facts' },
        row('Service', registration.service ? serviceLink(`${namespace}/${registration.service}`) : '-'),
        row('Address', registration.address || (w.resource && w.resource.spec.address) || '-'),
        row('Health', registration.service ? `${registration.healthy ? 'healthy' : 'unhealthy'} (${registration.health || ''})` : '-'),
        row('Identity', proxy.identity || registration.identity || 'none (plaintext)'),
        row('Certificate', certificate ? h('code', {}, certificate.serial) : 'not reported'),
        row('Issuer', certificate ? certificate.issuer : '-'),
        row('Expires in', certificate ? expires : '-', certificate ? ` (${fmtTime(certificate.notAfter)})` : ''),
        row('Proxy', proxy.proxyVersion ? `version ${proxy.proxyVersion}, held by control plane ${proxy.controlPlane}, connected ${fmtTime(proxy.connectedAt)}` : 'not connected'),
        row('Configuration sent', proxy.sentVersion || '-'),
        row('Configuration applied', h('span', { id: 'workload-applied' }, proxy.appliedVersion || '-')),
        row('Last NACK', proxy.lastNack ? h('span', { class: 'error' }, proxy.lastNack) : 'none')),
      h('h2', {}, 'The configuration it runs'),
      configuration ? h('pre', { id: 'workload-configuration' }, configuration.yaml || '(empty)')
        : h('p', { class: 'muted' }, 'Held by another control-plane replica, or not connected: that replica describes it.'));
    tick();
  };
  const tick = () => { if (expiry) expires.textContent = countdown(expiry); };
  load();
  const timers = [setInterval(load, 10000), setInterval(tick, 1000)];
  return () => { timers.forEach(clearInterval); controller.abort(); };
}

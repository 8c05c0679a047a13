// The dashboard's shell: login, the page router, and the header. Every view's state is
// in the URL's fragment (`#/service/default/reviews?window=1h`), never the token, so a
// link can be sent to a colleague, who logs in with their own.

import * as api from './api.js';
import { fill, h } from './dom.js';
import * as topology from './topology.js';
import * as service from './service.js';
import * as config from './config.js';
import * as security from './security.js';
import * as mesh from './mesh.js';
import * as tap from './tap.js';
import * as workload from './workload.js';

const pages = { topology, service, config, security, mesh, tap, workload };
const context = { session: null };
let unmount = null;

/** The route in the fragment: page name, path parts and query parameters. */
export function route() {
  const fragment = location.hash.replace(/^#\/?/, '');
  const [path, query = ''] = fragment.split('?', 2);
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || 'topology', parts: parts.slice(1), params: new URLSearchParams(query) };
}

/** Rewrites the query of the current view (e.g. a filter changed) without reloading it. */
export function setParams(params) {
  const { page, parts } = route();
  const query = params.toString();
  const path = [page, ...parts].map(encodeURIComponent).join('/');
  history.replaceState(null, '', `#/${path}${query ? `?${query}` : ''}`);
}
context.setParams = setParams;

function render() {
  if (unmount) { unmount(); unmount = null; }
  const target = document.getElementById('page');
  if (!context.session) return;
  const { page, parts, params } = route();
  const module = pages[page];
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.dataset.page === page) link.setAttribute('aria-current', 'page'); else link.removeAttribute('aria-current');
  }
  if (!module) {
    fill(target, h('p', { class: 'error' }, `No page "${page}".`));
    return;
  }
  fill(target);
  document.title = `weft: ${page}`;
  unmount = module.mount(target, parts, params, context) || null;
}

function showSession(session) {
  context.session = session;
  const loggedIn = Boolean(session);
  document.getElementById('login').hidden = loggedIn;
  document.getElementById('nav').hidden = !loggedIn;
  document.getElementById('logout').hidden = !loggedIn;
  const who = document.getElementById('who');
  who.textContent = loggedIn ? `${session.operator.name} (${session.operator.role})` : '';
  if (!loggedIn) {
    if (unmount) { unmount(); unmount = null; }
    fill(document.getElementById('page'));
    document.getElementById('token').focus();
    return;
  }
  render();
}

async function start() {
  api.whenLoggedOut(() => showSession(null));
  document.getElementById('login-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const input = document.getElementById('token');
    const error = document.getElementById('login-error');
    error.textContent = '';
    try {
      const session = await api.login(input.value.trim());
      input.value = '';
      showSession(session);
    } catch (refusal) {
      error.textContent = refusal.message;
      input.select();
    }
  });
  document.getElementById('logout').addEventListener('click', async () => {
    await api.logout();
    showSession(null);
  });
  window.addEventListener('hashchange', render);
  showSession(await api.resume());
}

start();

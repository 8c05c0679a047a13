// Configuration: every resource, searchable, shown as YAML. An admin edits and applies
// it with the same validation as `weft apply` (the control plane judges the text, and
// names each error's field, line and column; the editor marks those lines), can ask for
// a dry run first, and sees the store revision the change made. A new resource starts
// from an empty editor.

import * as api from './api.js';
import { fill, h } from './dom.js';

export function mount(target, _parts, params, context) {
  const admin = context.session.operator.role === 'admin';
  const search = h('input', { id: 'config-search', type: 'search', placeholder: 'kind, namespace or name', value: params.get('q') || '' });
  const list = h('ul', { id: 'config-list', 'aria-label': 'Resources' });
  const title = h('h2', {}, 'Select a resource');
  const meta = h('p', { class: 'muted' });
  const gutter = h('div', { class: 'gutter', 'aria-hidden': 'true' });
  const editor = h('textarea', { id: 'config-editor', spellcheck: 'false', 'aria-label': 'Resource YAML', readonly: !admin, wrap: 'off' });
  const messages = h('div', { id: 'config-messages', role: 'status', 'aria-live': 'polite' });
  const dryRun = h('button', { type: 'button', id: 'config-dry-run', disabled: !admin }, 'Dry run');
  const apply = h('button', { type: 'button', id: 'config-apply', class: 'primary', disabled: !admin }, 'Apply');
  const fresh = h('button', { type: 'button', id: 'config-new', disabled: !admin }, 'New resource');
  fill(target,
    h('h1', {}, 'Configuration'),
    h('div', { class: 'config' },
      h('div', {}, h('div', { class: 'toolbar' }, h('label', { for: 'config-search' }, 'Search', search)), list),
      h('div', {}, title, meta,
        h('div', { class: 'editor' }, gutter, editor),
        h('div', { class: 'toolbar' }, dryRun, apply, fresh,
          admin ? null : h('span', { class: 'muted' }, 'A viewer token can read; applying needs an admin token.')),
        messages)));

  let items = [];
  let marked = new Set();
  const controller = new AbortController();

  function numberLines() {
    const count = editor.value.split('\n').length;
    fill(gutter, Array.from({ length: count }, (_, i) => h('span', { class: marked.has(i + 1) ? 'bad' : null, dataset: { line: i + 1 } }, String(i + 1))));
    gutter.scrollTop = editor.scrollTop;
  }
  editor.addEventListener('input', () => { marked = new Set(); numberLines(); });
  editor.addEventListener('scroll', () => { gutter.scrollTop = editor.scrollTop; });

  function showList() {
    const wanted = search.value.trim().toLowerCase();
    const shown = items.filter((item) => !wanted || `${item.kind} ${item.namespace}/${item.name}`.toLowerCase().includes(wanted));
    const kinds = [...new Set(shown.map((item) => item.kind))];
    const current = `${params.get('kind')}/${params.get('namespace')}/${params.get('name')}`;
    fill(list, kinds.map((kind) => [h('li', { class: 'kind' }, kind),
      shown.filter((item) => item.kind === kind).map((item) => h('li', {}, h('a', {
        href: `#/config?kind=${encodeURIComponent(item.kind)}&namespace=${encodeURIComponent(item.namespace)}&name=${encodeURIComponent(item.name)}`,
        'aria-current': `${item.kind}/${item.namespace}/${item.name}` === current ? 'true' : null,
      }, `${item.namespace}/${item.name}`)))]));
  }
  search.addEventListener('input', () => {
    const next = new URLSearchParams(params);
    if (search.value) next.set('q', search.value); else next.delete('q');
    context.setParams(next);
    showList();
  });

  async function open() {
    const kind = params.get('kind'); const namespace = params.get('namespace'); const name = params.get('name');
    if (!kind || !name) { numberLines(); return; }
    try {
      const item = await api.get(`/resources/${encodeURIComponent(kind)}/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}?output=yaml`, controller.signal);
      title.textContent = `${item.kind} ${item.namespace}/${item.name}`;
      meta.textContent = `revision ${item.revision} (created at ${item.createdRevision})`;
      editor.value = item.yaml;
      marked = new Set();
      numberLines();
    } catch (error) {
      if (error.name !== 'AbortError') fill(messages, h('p', { class: 'error' }, error.message));
    }
  }

  /** Marks the lines the control plane named, and lists every error. */
  function refused(error) {
    marked = new Set(error.errors.filter((e) => e.line).map((e) => e.line));
    numberLines();
    const first = error.errors.find((e) => e.line);
    if (first) {
      const lines = editor.value.split('\n');
      const start = lines.slice(0, first.line - 1).reduce((sum, line) => sum + line.length + 1, 0) + Math.max(0, (first.column || 1) - 1);
      editor.focus();
      editor.setSelectionRange(start, start + Math.max(1, lines[first.line - 1].length - (first.column || 1) + 1));
      editor.scrollTop = Math.max(0, (first.line - 4) * 18);
    }
    fill(messages,
      h('p', { class: 'error' }, error.message),
      h('ul', { class: 'messages' }, (error.errors.length ? error.errors : error.details.map((message) => ({ message }))).map((e) =>
        h('li', { class: 'error', dataset: { line: e.line || '' } },
          e.line ? `line ${e.line}, column ${e.column}: ` : '', e.field ? `${e.field}: ` : '', e.message))));
  }

  async function send(dry) {
    fill(messages, h('p', { class: 'muted' }, dry ? 'checking…' : 'applying…'));
    try {
      const report = await api.change('POST', `/apply${dry ? '?dryRun=true' : ''}`, { sources: [{ name: 'dashboard editor', text: editor.value }] });
      marked = new Set();
      numberLines();
      const preview = report.preview;
      const list = (items) => (items.length ? items.join(', ') : 'none');
      fill(messages,
        h('p', { class: 'health-ok', id: 'config-outcome' }, dry ? 'Valid: nothing was changed (dry run).' : `Applied at store revision ${report.revision}.`),
        h('ul', {}, report.results.map((result) => h('li', {}, `${result.kind} ${result.namespace}/${result.name}: ${result.action}${dry ? ' (would be)' : ''}`))),
        preview ? h('div', { id: 'config-preview' },
          h('h2', {}, 'What this change would touch'),
          preview.meshWide ? h('p', {}, 'Every proxy: a MeshConfig is in every view.') : null,
          h('dl', {},
            h('dt', {}, 'Services'), h('dd', { id: 'preview-services' }, list(preview.services)),
            h('dt', {}, 'Their routes'), h('dd', { id: 'preview-routes' }, list(preview.routes)),
            h('dt', {}, 'Proxies whose configuration would change'), h('dd', { id: 'preview-proxies' }, list(preview.proxies)),
            h('dt', {}, 'Proxies unchanged'), h('dd', {}, String(preview.proxiesUnchanged)))) : null);
      if (!dry) { await load(); }
    } catch (error) {
      if (error.status === 422) refused(error);
      else fill(messages, h('p', { class: 'error' }, error.message));
    }
  }
  dryRun.addEventListener('click', () => send(true));
  apply.addEventListener('click', () => send(false));
  fresh.addEventListener('click', () => {
    title.textContent = 'New resource';
    meta.textContent = '';
    editor.value = 'apiVersion: weft.dev/v1alpha1\nkind: \nmetadata:\n  name: \n  namespace: default\nspec:\n';
    marked = new Set();
    numberLines();
    editor.focus();
  });

  async function load() {
    try {
      const answer = await api.get('/resources', controller.signal);
      items = answer.items;
      showList();
    } catch (error) {
      if (error.name !== 'AbortError') fill(messages, h('p', { class: 'error' }, error.message));
    }
  }
  load().then(open);
  return () => controller.abort();
}

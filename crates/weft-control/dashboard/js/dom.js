// Small DOM helpers. Text from the mesh only ever enters the page as text nodes or
// attribute values (never as markup), so a Service named `<script>` stays a name.

/** Makes an element: h('a', {href: '#/x', class: 'y'}, 'text', child, ...). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      element.addEventListener(name.slice(2), value);
    } else if (name === 'dataset') {
      Object.assign(element.dataset, value);
    } else {
      element.setAttribute(name, value === true ? '' : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

/** A table from column headings and rows of cells (a cell may be a node or text). */
export function table(headings, rows, attributes = {}) {
  return h('table', attributes,
    h('thead', {}, h('tr', {}, headings.map((heading) => h('th', { scope: 'col' }, heading)))),
    h('tbody', {}, rows.map((row) => h('tr', {}, row.map((cell) =>
      cell && cell.numeric ? h('td', { class: 'num' }, cell.text) : h('td', {}, cell))))));
}

/** A numeric cell for `table`. */
export const num = (text) => ({ numeric: true, text });

export const fmtRps = (value) => (value === null || value === undefined) ? '-' : value >= 100 ? value.toFixed(0) : value.toFixed(2);
export const fmtPct = (value) => (value === null || value === undefined) ? '-' : `${(value * 100).toFixed(value >= 0.9995 || value === 0 ? 0 : 2)}%`;
export const fmtMs = (value) => (value === null || value === undefined) ? '-' : value >= 100 ? `${value.toFixed(0)} ms` : `${value.toFixed(1)} ms`;
export const fmtTime = (seconds) => new Date(seconds * 1000).toLocaleString();

/** A `namespace/name` link to a Service's page. */
export function serviceLink(qualified, query = '') {
  const [namespace, name] = qualified.includes('/') ? qualified.split('/', 2) : ['', qualified];
  if (!namespace) return document.createTextNode(qualified);
  return h('a', { href: `#/service/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}${query}` }, qualified);
}

/** Replaces a node's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  for (const child of children.flat(Infinity)) {
    if (child !== undefined && child !== null && child !== false) node.append(child);
  }
}

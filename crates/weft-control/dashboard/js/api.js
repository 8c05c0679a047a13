// The dashboard's only door to the mesh: the public HTTP API, with the session cookie
// the browser holds (HttpOnly: no script here can read it) and, for a change, the
// session's CSRF token, which lives only in this module's memory.

let csrf = null;
let onLoggedOut = () => {};

/** Called when the API says the session is gone (expired, revoked, logged out). */
export function whenLoggedOut(handler) { onLoggedOut = handler; }

/** A refusal from the API: its status, message and (for a refused apply) errors. */
export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status;
    this.details = (body && body.details) || [];
    this.errors = (body && body.errors) || [];
  }
}

async function answer(response) {
  const type = response.headers.get('content-type') || '';
  const body = type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) {
    if (response.status === 401) onLoggedOut();
    throw new ApiError(response.status, typeof body === 'object' ? body : { error: body });
  }
  return body;
}

/** GET `path` (under /api/v1) as JSON. */
export async function get(path, signal) {
  return answer(await fetch(`/api/v1${path}`, { credentials: 'same-origin', signal }));
}

/** A change: `method` on `path` with a JSON body, carrying the CSRF token. */
export async function change(method, path, body) {
  return answer(await fetch(`/api/v1${path}`, {
    method,
    credentials: 'same-origin',
    headers: { 'content-type': 'application/json', 'x-csrf-token': csrf || '' },
    body: body === undefined ? undefined : JSON.stringify(body),
  }));
}

/** Opens a session with an operator token; the token is not kept. */
export async function login(token) {
  const session = await answer(await fetch('/api/v1/session', {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ token }),
  }));
  csrf = session.csrf;
  return session;
}

/** The session this browser already has (after a reload), or null. */
export async function resume() {
  const response = await fetch('/api/v1/session', { credentials: 'same-origin' });
  const session = response.ok ? await response.json() : null;
  if (!session || !session.operator) return null;
  csrf = session.csrf;
  return session;
}

export async function logout() {
  csrf = null;
  await fetch('/api/v1/session', { method: 'DELETE', credentials: 'same-origin' });
}

/** Streams JSON lines from `path` (a tap), calling `onLine` for each, until `signal` aborts. */
export async function stream(path, onLine, signal) {
  const response = await fetch(`/api/v1${path}`, { credentials: 'same-origin', signal });
  if (!response.ok) await answer(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += value;
    let end;
    while ((end = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, end).trim();
      pending = pending.slice(end + 1);
      if (line) onLine(JSON.parse(line));
    }
  }
}

// Changes from the audit log that concern one Service, and a line diff to show them:
// the Service itself, the routes whose parents name it and the policies that target it,
// judged by the document before or after the change (so a deleted route still counts).

/** The audit entries of `entries` that changed Service `namespace/name`'s behaviour. */
export function changesOf(entries, namespace, name) {
  return entries.filter((entry) => {
    const { kind, namespace: at, name: subject } = entry.subject;
    if (kind === 'Service') return at === namespace && subject === name;
    const documents = [entry.before, entry.after].filter(Boolean);
    if (kind === 'HTTPRoute' || kind === 'GRPCRoute') {
      return documents.some((d) => ((d.spec && d.spec.parentRefs) || []).some((p) => p.name === name && (p.namespace || at) === namespace));
    }
    if (kind === 'TrafficPolicy' || kind === 'AuthorizationPolicy') {
      return documents.some((d) => d.spec && d.spec.targetRef && d.spec.targetRef.name === name && (d.spec.targetRef.namespace || at) === namespace);
    }
    return false;
  });
}

/** `[mark, line]` pairs from `before` to `after`: ' ' kept, '-' removed, '+' added. */
export function lineDiff(before, after) {
  const a = before ? before.replace(/\n$/, '').split('\n') : [];
  const b = after ? after.replace(/\n$/, '').split('\n') : [];
  // Longest common subsequence, by dynamic programming: documents are short.
  const lcs = Array.from({ length: a.length + 1 }, () => new Uint16Array(b.length + 1));
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out = [];
  let i = 0; let j = 0;
  while (i < a.length && j < b.length) {
    if (a[i] === b[j]) { out.push([' ', a[i]]); i++; j++; } else if (lcs[i + 1][j] >= lcs[i][j + 1]) { out.push(['-', a[i++]]); } else { out.push(['+', b[j++]]); }
  }
  while (i < a.length) out.push(['-', a[i++]]);
  while (j < b.length) out.push(['+', b[j++]]);
  return out;
}

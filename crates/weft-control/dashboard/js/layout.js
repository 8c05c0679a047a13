// Lays out the topology. d3-force does the placing: calls pull caller and callee
// together, every node pushes the others away, and each namespace gathers around an
// anchor of its own. A last pass of our own then pushes apart any two boxes that still
// overlap (a force layout only makes that unlikely), so no label ever hides another.
//
// Positions are kept by name between refreshes: a refresh that brings no new Service
// does not move anything, and a new Service starts beside one it calls.

const GAP = 8;

/** A number in [0, 1) from a name, so that the same mesh lays out the same way. */
function hash01(text) {
  let value = 2166136261;
  for (let i = 0; i < text.length; i++) {
    value ^= text.charCodeAt(i);
    value = Math.imul(value, 16777619);
  }
  return ((value >>> 0) % 100000) / 100000;
}

export class Layout {
  constructor() {
    this.positions = new Map();
    this.running = null;
  }

  /**
   * Places `nodes` ({name, namespace, w, h}; x and y are set) linked by `links`
   * ({source, target} indices). Runs synchronously for up to `budgetMs`, then goes on in
   * animation frames, calling `onFrame` after each, and `onSettled` once no box overlaps.
   */
  place(nodes, links, { budgetMs = nodes.length > 300 ? 60 : 300, onFrame = () => {}, onSettled = () => {} } = {}) {
    this.stop();
    const namespaces = [...new Set(nodes.map((node) => node.namespace))].sort();
    const spread = 60 * Math.sqrt(nodes.length + 1);
    const anchors = new Map(namespaces.map((namespace, i) => {
      if (namespaces.length === 1) return [namespace, { x: 0, y: 0 }];
      const angle = (2 * Math.PI * i) / namespaces.length;
      return [namespace, { x: Math.cos(angle) * spread, y: Math.sin(angle) * spread }];
    }));
    const neighbours = nodes.map(() => []);
    for (const link of links) {
      neighbours[link.source].push(link.target);
      neighbours[link.target].push(link.source);
    }
    let fresh = 0;
    nodes.forEach((node) => {
      const known = this.positions.get(node.name);
      if (known) { node.x = known.x; node.y = known.y; }
    });
    nodes.forEach((node, i) => {
      if (this.positions.has(node.name)) return;
      fresh++;
      const placed = neighbours[i].map((j) => nodes[j]).find((other) => other.x !== undefined);
      const angle = 2 * Math.PI * hash01(node.name);
      const base = placed || anchors.get(node.namespace);
      const distance = placed ? 80 : spread * 0.5 * hash01(`${node.name}#r`);
      node.x = base.x + Math.cos(angle) * distance;
      node.y = base.y + Math.sin(angle) * distance;
    });
    const settle = () => {
      separate(nodes);
      for (const node of nodes) this.positions.set(node.name, { x: node.x, y: node.y });
      onSettled();
    };
    if (fresh === 0 || !window.d3 || !window.d3.forceSimulation) {
      settle();
      return;
    }
    const d3 = window.d3;
    for (const node of nodes) node.r = Math.hypot(node.w, node.h) / 2 + GAP / 2;
    // A small mesh gets room for the calls' labels; a big one, density.
    const room = nodes.length <= 60 ? 2 : 1;
    const simulation = d3.forceSimulation(nodes)
      .force('link', d3.forceLink(links.map((link) => ({ ...link }))).distance((link) => link.source.r + link.target.r + 40 * room))
      .force('charge', d3.forceManyBody().strength(-220 * room).theta(0.9).distanceMax(900))
      .force('collide', d3.forceCollide((node) => node.r).iterations(2))
      .force('x', d3.forceX((node) => anchors.get(node.namespace).x).strength(0.04))
      .force('y', d3.forceY((node) => anchors.get(node.namespace).y).strength(0.04))
      .alpha(fresh === nodes.length ? 1 : 0.35)
      .alphaMin(0.02)
      // A big graph settles in fewer, coarser steps: its first picture matters more
      // than the last few pixels of its layout.
      .alphaDecay(nodes.length > 300 ? 0.06 : 0.0228)
      .stop();
    const started = performance.now();
    while (simulation.alpha() > simulation.alphaMin() && performance.now() - started < budgetMs) simulation.tick();
    if (simulation.alpha() <= simulation.alphaMin()) {
      settle();
      return;
    }
    onFrame();
    // Ticks in frames of up to 40 ms, and a picture at most every 200 ms: drawing ten
    // thousand calls costs more than a tick.
    let drawn = performance.now();
    const frame = () => {
      const from = performance.now();
      while (simulation.alpha() > simulation.alphaMin() && performance.now() - from < 40) simulation.tick();
      if (simulation.alpha() <= simulation.alphaMin()) {
        this.running = null;
        settle();
        return;
      }
      if (performance.now() - drawn > 200) {
        onFrame();
        drawn = performance.now();
      }
      this.running = requestAnimationFrame(frame);
    };
    this.running = requestAnimationFrame(frame);
  }

  stop() {
    if (this.running) cancelAnimationFrame(this.running);
    this.running = null;
  }
}

/** Pushes overlapping boxes apart (sweep along x), until none overlap. */
export function separate(nodes, gap = GAP) {
  for (let pass = 0; pass < 200; pass++) {
    const order = nodes.slice().sort((a, b) => (a.x - a.w / 2) - (b.x - b.w / 2));
    let moved = false;
    for (let i = 0; i < order.length; i++) {
      const a = order[i];
      for (let j = i + 1; j < order.length; j++) {
        const b = order[j];
        if ((b.x - b.w / 2) > (a.x + a.w / 2) + gap) break;
        const dx = b.x - a.x;
        const dy = b.y - a.y;
        const overlapX = (a.w + b.w) / 2 + gap - Math.abs(dx);
        const overlapY = (a.h + b.h) / 2 + gap - Math.abs(dy);
        if (overlapX <= 0 || overlapY <= 0) continue;
        moved = true;
        // Out along the shorter way, half each.
        if (overlapY < overlapX) {
          const push = (overlapY / 2 + 0.5) * (dy >= 0 ? 1 : -1);
          a.y -= push; b.y += push;
        } else {
          const push = (overlapX / 2 + 0.5) * (dx >= 0 ? 1 : -1);
          a.x -= push; b.x += push;
        }
      }
    }
    if (!moved) return;
  }
}

// A seeded generator of random statecharts (within the subset switchyard-machine loads) and of
// random event/clock sequences to run on them.

/** mulberry32: a small, fast, seeded PRNG; the same seed gives the same corpus everywhere. */
export function rng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const r = {
    next,
    chance: (p) => next() < p,
    int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)),
    pick: (xs) => xs[Math.floor(next() * xs.length)],
  };
  return r;
}

const EXACT_EVENTS = ['E1', 'E2', 'E3', 'E4', 'x.y', 'x.y.w'];
const WILDCARDS = ['x.*', 'x.y.*', '*'];
/** What the sequences send: the exact names, names only wildcards match, and one nobody handles. */
export const SENT_EVENTS = ['E1', 'E2', 'E3', 'E4', 'x.y', 'x.y.w', 'x.z', 'x', 'Q'];
const PAYLOAD_GUARDS = ['g1', 'g2', 'g3'];
const DELAYS = [100, 200, 300, 500];
const KEYS = 'abcdefghijklmnopqrstuvwxyz'.split('');

/**
 * A random chart: nested compound and parallel states, finals (also directly in parallel
 * regions), custom ids, entry/exit actions, guarded candidates, every target form, `always`,
 * `onDone`, `after`, wildcards and `reenter`.
 */
export function generateChart(r, machineId = 'm') {
  let keyIndex = 0;
  const nextKey = () => {
    const k = keyIndex < KEYS.length ? KEYS[keyIndex] : `s${keyIndex}`;
    keyIndex += 1;
    return k;
  };
  const nodes = [];
  const maxStates = r.int(6, 18);
  const make = (parent, depth, type) => {
    const node = { key: parent ? nextKey() : machineId, parent, type, children: [], depth };
    node.path = parent ? [...parent.path, node.key] : [];
    nodes.push(node);
    if (type === 'compound' || type === 'parallel') {
      const n = type === 'parallel' ? r.int(2, 3) : r.int(2, 3);
      for (let i = 0; i < n; i += 1) {
        const room = nodes.length < maxStates && depth < 3;
        let kind;
        const x = r.next();
        if (type === 'parallel') {
          kind = !room ? (x < 0.9 ? 'atomic' : 'final')
            : x < 0.6 ? 'compound' : x < 0.75 ? 'parallel' : x < 0.93 ? 'atomic' : 'final';
        } else {
          kind = !room ? (x < 0.8 ? 'atomic' : 'final')
            : x < 0.45 ? 'atomic' : x < 0.7 ? 'compound' : x < 0.82 ? 'parallel' : 'final';
        }
        node.children.push(make(node, depth + 1, kind));
      }
      if (type === 'compound') {
        const nonFinal = node.children.filter((c) => c.type !== 'final');
        node.initial = (nonFinal.length && r.chance(0.9) ? r.pick(nonFinal) : r.pick(node.children)).key;
      }
    }
    if (parent && r.chance(0.25)) node.customId = `i_${node.key}`;
    return node;
  };
  const root = make(null, 0, r.chance(0.2) ? 'parallel' : 'compound');
  root.id = machineId;
  for (const n of nodes) n.id = n.customId ?? [machineId, ...n.path].join('.');

  const ancestors = (n) => {
    const out = [];
    for (let p = n.parent; p; p = p.parent) out.push(p);
    return out;
  };
  const descendants = (n) => n.children.flatMap((c) => [c, ...descendants(c)]);
  const ref = (n) => `#${n.id}`;
  let actionIndex = 0;

  // One target (string or array) from `n`, in a random form; undefined = targetless.
  const target = (n) => {
    const x = r.next();
    const siblings = n.parent ? n.parent.children.filter((c) => c !== n) : [];
    if (x < 0.12) return undefined;
    if (x < 0.35 && siblings.length) return r.pick(siblings).key; // sibling key
    if (x < 0.35 && n.parent) return n.key; // own key: a self-transition
    if (x < 0.48 && n.children.length) {
      // `.child` or `.child.grandchild`
      const c = r.pick(n.children);
      return c.children.length && r.chance(0.4) ? `.${c.key}.${r.pick(c.children).key}` : `.${c.key}`;
    }
    if (x < 0.56 && n.parent) return ref(r.pick(ancestors(n))); // an ancestor (`#m` is the root)
    if (x < 0.63) {
      // `#id.child`: a state with a custom id (or the root) and a path below it
      const withId = nodes.filter((m) => (m.customId || m === root) && m.children.length);
      if (withId.length) {
        const m = r.pick(withId);
        const c = r.pick(m.children);
        return `#${m.id}.${c.key}`;
      }
    }
    if (x < 0.75) {
      // several targets in distinct regions of one parallel state
      const parallels = nodes.filter((m) => m.type === 'parallel');
      if (parallels.length) {
        const p = r.pick(parallels);
        const regions = [...p.children].sort(() => r.next() - 0.5).slice(0, 2);
        return regions.map((reg) => {
          const deeper = descendants(reg);
          return ref(deeper.length && r.chance(0.7) ? r.pick(deeper) : reg);
        });
      }
    }
    return ref(r.pick(nodes)); // any state by id
  };
  const guard = () => {
    const x = r.next();
    if (x < 0.6) return undefined;
    if (x < 0.9) return r.pick(PAYLOAD_GUARDS);
    return { type: '$below', params: { n: r.int(1, 3) } };
  };
  const transition = (n, { counting = false } = {}) => {
    const t = {};
    const tg = target(n);
    if (tg !== undefined) t.target = tg;
    const g = counting ? { type: '$below', params: { n: r.int(1, 3) } } : guard();
    if (g !== undefined) t.guard = g;
    actionIndex += 1;
    const acts = [`t${actionIndex}`];
    if (counting || (t.guard && t.guard.type === '$below') || r.chance(0.15)) acts.push('$inc');
    t.actions = acts.length === 1 ? acts[0] : acts;
    if (tg !== undefined && r.chance(0.18)) t.reenter = true;
    // A plain string when that is all it is, to cover the short form.
    if (Object.keys(t).length === 2 && typeof t.target === 'string' && r.chance(0.3)) {
      return t.target;
    }
    return t;
  };
  const candidates = (n, opts) => {
    const k = r.chance(0.75) ? 1 : 2;
    const list = Array.from({ length: k }, () => transition(n, opts));
    return list.length === 1 ? list[0] : list;
  };

  const hasFinalBelow = (n) =>
    n.type === 'compound' ? n.children.some((c) => c.type === 'final')
    : n.type === 'parallel' ? n.children.every((c) => c.type === 'final' || hasFinalBelow(c))
    : false;

  const config = (n) => {
    const c = {};
    if (n === root) c.id = machineId;
    else if (n.customId) c.id = n.customId;
    if (n.type === 'parallel' || n.type === 'final') c.type = n.type;
    if (n === root) c.context = { count: 0 };
    if (n.initial) c.initial = n.initial;
    if (r.chance(0.7)) c.entry = r.chance(0.15) ? [`en_${n.key}`, `en2_${n.key}`] : `en_${n.key}`;
    if (r.chance(0.7)) c.exit = `ex_${n.key}`;
    if (n.type !== 'final') {
      const on = {};
      const count = n === root ? r.int(0, 2) : r.int(0, 3);
      for (let i = 0; i < count; i += 1) {
        const ev = r.chance(0.75) ? r.pick(EXACT_EVENTS) : r.pick(WILDCARDS);
        if (on[ev] === undefined) on[ev] = candidates(n);
      }
      if (Object.keys(on).length) c.on = on;
      if (r.chance(0.14)) {
        // Eventless: guarded by the event (whichever came last) or by the counter.
        c.always = r.chance(0.5) ? candidates(n, { counting: true }) : (() => {
          const t = transition(n);
          if (typeof t === 'string') return { target: t, guard: r.pick(PAYLOAD_GUARDS) };
          if (!t.guard && r.chance(0.7)) t.guard = r.pick(PAYLOAD_GUARDS);
          return t;
        })();
      }
      if (n.children.length && hasFinalBelow(n) && r.chance(0.6)) c.onDone = candidates(n);
      if (r.chance(0.16)) {
        const after = {};
        const k = r.chance(0.75) ? 1 : 2;
        for (let i = 0; i < k; i += 1) after[String(r.pick(DELAYS))] = candidates(n);
        c.after = after;
      }
    }
    if (n.children.length) {
      c.states = {};
      for (const ch of n.children) c.states[ch.key] = config(ch);
    }
    return c;
  };
  return config(root);
}

/**
 * A step source for `record`: `count` random steps, each an event (with random guard flags) or
 * a clock advance (to the next timer, or by a random amount).
 */
export function randomSteps(r, count, events = SENT_EVENTS, guards = PAYLOAD_GUARDS) {
  let left = count;
  return ({ nextDue }) => {
    if (left <= 0) return null;
    left -= 1;
    const advance = nextDue !== undefined ? r.chance(0.45) : r.chance(0.08);
    if (advance) {
      return { advance: nextDue !== undefined && r.chance(0.6) ? nextDue : r.pick([50, 100, 150, 250, 400, 1000]) };
    }
    const event = { type: r.pick(events) };
    for (const g of guards) if (r.chance(0.5)) event[g] = r.chance(0.6);
    return { send: event };
  };
}

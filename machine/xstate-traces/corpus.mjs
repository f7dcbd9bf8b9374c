// The hand-made part of the corpus: every chart in the repository's tests, benches, docs and
// examples, and the smallest charts of the differences listed in issue 12.

import fs from 'node:fs';
import path from 'node:path';

/** Where charts are looked for, relative to the repository root. */
const SEARCH = ['machine/tests', 'machine/benches', 'machine/src', 'examples', 'cli', 'tests', 'src', 'docs'];
/** Charts there that are invalid on purpose (they test load errors). */
const SKIP_FILES = ['machine/tests/invalid.rs'];

function walk(dir, out) {
  if (!fs.existsSync(dir)) return out;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) {
      if (e.name !== 'node_modules' && e.name !== 'target' && e.name !== 'xstate') walk(p, out);
    } else if (/\.(rs|json|md)$/.test(e.name)) {
      out.push(p);
    }
  }
  return out;
}

function isChart(v) {
  return v && typeof v === 'object' && !Array.isArray(v) && v.states && typeof v.states === 'object';
}

/**
 * Every statechart written out literally in the repository: `.json` files, and JSON in Rust raw
 * strings (`r#"..."#`, also inside `//!` doc comments). Charts built at run time (`format!`,
 * `json!`, `.replace`) are not found. Returns `[{ name, chart }]`, one per distinct chart.
 */
export function repoCharts(repoRoot) {
  const seen = new Set();
  const out = [];
  const add = (name, text) => {
    let v;
    try {
      v = JSON.parse(text);
    } catch {
      return;
    }
    if (!isChart(v)) return;
    const key = JSON.stringify(v);
    if (seen.has(key)) return;
    seen.add(key);
    out.push({ name, chart: v });
  };
  for (const dir of SEARCH) {
    for (const file of walk(path.join(repoRoot, dir), []).sort()) {
      const rel = path.relative(repoRoot, file);
      if (SKIP_FILES.includes(rel)) continue;
      const text = fs.readFileSync(file, 'utf8');
      if (file.endsWith('.json')) {
        add(`repo/${rel}`, text);
        continue;
      }
      if (!file.endsWith('.rs')) continue;
      const lines = text.split('\n').map((l) => l.replace(/^\s*\/\/[!/] ?/, ''));
      const src = lines.join('\n');
      const re = /r(#+)"([\s\S]*?)"\1/g;
      let m;
      while ((m = re.exec(src))) {
        const line = src.slice(0, m.index).split('\n').length;
        add(`repo/${rel}:${line}`, m[2]);
      }
    }
  }
  return out;
}

const send = (type, extra = {}) => ({ send: { type, ...extra } });

/** The smallest chart of each difference in issue 12, with the events that show it. */
export const ISSUE_CHARTS = [
  {
    name: 'issue/1 top-level final state runs the exit actions',
    chart: { id: 'm', initial: 'a', exit: 'ex_root', states: { a: { exit: 'ex_a', on: { E: 'f' } }, f: { type: 'final', exit: 'ex_f' } } },
    steps: [send('E'), send('E')],
  },
  {
    name: 'issue/2 a parallel root as the transition domain keeps every region',
    chart: { id: 'm', type: 'parallel', states: { a: {}, b: { on: { E: 'a' } } } },
    steps: [send('E')],
  },
  {
    name: 'issue/3 a parallel transition domain is not exited',
    chart: { id: 'm', initial: 'p', states: { p: { type: 'parallel', entry: 'en_p', exit: 'ex_p', states: { a: { on: { E: 'b' } }, b: {} } } } },
    steps: [send('E')],
  },
  {
    name: 'issue/3b nested parallel domain keeps the outer regions and timers',
    chart: {
      id: 'm', type: 'parallel',
      states: {
        o: { initial: 'o1', states: { o1: { entry: 'en_o1', after: { 200: 'o2' } }, o2: { entry: 'en_o2' } } },
        p: {
          type: 'parallel', entry: 'en_p', exit: 'ex_p', after: { 300: { actions: 'tick_p' } },
          states: { a: { entry: 'en_a', exit: 'ex_a', on: { E: 'b' } }, b: { entry: 'en_b', exit: 'ex_b' } },
        },
      },
    },
    steps: [{ advance: 100 }, send('E'), { advance: 100 }, { advance: 100 }, send('E'), { advance: 300 }],
  },
  {
    name: 'issue/4 a handler above a parallel state waits for the regions',
    chart: { id: 'm', initial: 'p', states: { p: { type: 'parallel', on: { E: { actions: 'onP' } }, states: { a: { on: { E: { actions: 'onA' } } }, b: {} } } } },
    steps: [send('E')],
  },
  {
    name: 'issue/4b with a target on the outer handler',
    chart: { id: 'm', initial: 'p', states: { p: { type: 'parallel', on: { E: { target: 'q', actions: 'onP' }, F: 'q' }, states: { a: { on: { E: { actions: 'onA' } } }, b: {} } }, q: {} } },
    steps: [send('E'), send('F')],
  },
  {
    name: 'issue/5 overlapping wildcards: the longer pattern wins',
    chart: { id: 'm', initial: 'a', states: { a: { on: { 'x.*': 'b', 'x.y.*': 'c' } }, b: {}, c: {} } },
    steps: [send('x.y.w')],
  },
  {
    name: 'issue/5b wildcards after the exact name, longest first, then document order',
    chart: {
      id: 'm', initial: 'a',
      states: {
        a: { on: { '*': { actions: 'any' }, 'x.*': { actions: 'x' }, 'x.y': { actions: 'exact', guard: 'g1' }, 'x.y.*': { actions: 'xy', guard: 'g2' } } },
      },
    },
    steps: [send('x.y', { g1: true }), send('x.y', { g2: true }), send('x.y'), send('x.q'), send('z')],
  },
  {
    name: 'issue/6 reenter on the root',
    chart: { id: 'm', initial: 'a', entry: 'en_root', exit: 'ex_root', on: { E: { target: '.a', reenter: true } }, states: { a: {} } },
    steps: [send('E')],
  },
  {
    name: 'issue/7 a final state directly inside a parallel region',
    chart: { id: 'm', initial: 'p', states: { p: { type: 'parallel', onDone: 'q', states: { a: { type: 'final' }, b: {} } }, q: {} } },
    steps: [send('E')],
  },
  {
    name: 'issue/7b with a parallel root',
    chart: { id: 'm', type: 'parallel', states: { a: { type: 'final' }, b: { initial: 'b1', states: { b1: { on: { E: 'b2' } }, b2: { type: 'final' } } } } },
    steps: [send('F'), send('E'), send('E')],
  },
  {
    name: 'issue/8 nested parallel states complete',
    chart: {
      id: 'm', initial: 'p',
      states: {
        p: {
          type: 'parallel', onDone: { target: 'q', actions: 'done_p' },
          states: {
            a: {
              type: 'parallel', onDone: { actions: 'done_a' },
              states: {
                x: { initial: 'x1', states: { x1: { on: { E: 'x2' } }, x2: { type: 'final' } } },
                y: { initial: 'y1', states: { y1: { on: { F: 'y2' } }, y2: { type: 'final' } } },
              },
            },
            b: { initial: 'b1', states: { b1: { on: { E: 'b2' } }, b2: { type: 'final' } } },
          },
        },
        q: {},
      },
    },
    steps: [send('E'), send('F')],
  },
  {
    name: 'issue/9 eventless transitions of parallel regions in entry order',
    chart: {
      id: 'm', type: 'parallel',
      states: {
        a: { initial: 'a1', states: { a1: { on: { F: 'a2' } }, a2: { always: { guard: 'g1', target: 'a3', actions: 'ta' } }, a3: {} } },
        b: { initial: 'b1', states: { b1: { on: { G: 'b2' } }, b2: { always: { guard: 'g1', target: 'b3', actions: 'tb' } }, b3: {} } },
      },
    },
    steps: [send('G'), send('F'), send('H', { g1: true })],
  },
  {
    name: 'issue/9b events in parallel regions in entry order',
    chart: {
      id: 'm', type: 'parallel',
      states: {
        a: { initial: 'a1', states: { a1: { on: { F: 'a2' } }, a2: { on: { H: { target: 'a3', actions: 'ta' } } }, a3: {} } },
        b: { initial: 'b1', states: { b1: { on: { G: 'b2' } }, b2: { on: { H: { target: 'b3', actions: 'tb' } } }, b3: {} } },
      },
    },
    steps: [send('G'), send('F'), send('H')],
  },
  {
    name: 'issue/extra targeting the root from a child enters the root again',
    chart: { id: 'm', initial: 'a', entry: 'en_root', exit: 'ex_root', states: { a: { entry: 'en_a', exit: 'ex_a', on: { E: '#m', F: { target: '#m', reenter: true } } }, b: {} } },
    steps: [send('E'), send('F')],
  },
  {
    name: 'issue/extra an eventless targetless transition runs once per step',
    chart: { id: 'm', initial: 'a', states: { a: { always: { actions: 'once' }, on: { E: { actions: 'e' } } } } },
    steps: [send('E'), send('Q')],
  },
  {
    name: 'issue/extra eventless guards see the last event',
    chart: { id: 'm', initial: 'a', states: { a: { always: { guard: 'g1', target: 'b' } }, b: { always: { guard: 'g1', target: 'c' }, on: { E: 'b' } }, c: { on: { E: 'b' } } } },
    steps: [send('Q'), send('Q', { g1: true }), send('E'), send('E', { g1: true })],
  },
];

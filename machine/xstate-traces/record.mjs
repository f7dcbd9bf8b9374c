// Records the XState v5 reference traces that machine/tests/xstate_traces.rs replays.
//
//   npm ci && node record.mjs [--generated N] [--seed S] [--out DIR]
//
// Writes machine/tests/xstate/{repo,issue,generated}.json. The files are the contract: CI has
// no node and only replays them; run this again after changing the corpus or the generator.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

import { record } from './xstate-run.mjs';
import { generateChart, randomSteps, rng, SENT_EVENTS } from './generate.mjs';
import { repoCharts, ISSUE_CHARTS } from './corpus.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..', '..');
function argText(name) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}
// `--out DIR` writes a corpus elsewhere, e.g. a large one to try with XSTATE_TRACES_DIR=DIR.
const outDir = path.resolve(argText('out') ?? path.resolve(here, '..', 'tests', 'xstate'));
const xstateVersion = createRequire(import.meta.url)('xstate/package.json').version;

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}
const GENERATED = arg('generated', 500);
const SEED = arg('seed', 12);

const stats = { recorded: 0, truncated: 0, rejected: [] };

/** Runs one chart; returns its fixture entry, or null when XState rejects the chart. */
function entry(name, chart, nextStep, note) {
  let result;
  try {
    result = record(chart, nextStep);
  } catch (e) {
    stats.rejected.push(`${name}: ${e.message.split('\n')[0]}`);
    return null;
  }
  if (result.steps.length === 0) {
    stats.rejected.push(`${name}: ${result.error}`);
    return null;
  }
  stats.recorded += 1;
  const out = { name };
  if (note) out.note = note;
  out.chart = chart;
  out.steps = result.steps;
  if (result.error) {
    stats.truncated += 1;
    out.truncated = `XState failed on the next step (${result.error}); the trace ends here`;
  }
  return out;
}

/** Event names a chart reacts to, with a concrete name for each wildcard, for random sequences. */
function eventsOf(chart) {
  const names = new Set();
  const visit = (s) => {
    for (const k of Object.keys(s.on ?? {})) {
      if (k === '*') names.add('ANY');
      else if (k.endsWith('.*')) names.add(`${k.slice(0, -2)}.w`);
      else if (k !== '') names.add(k);
    }
    for (const c of Object.values(s.states ?? {})) visit(c);
  };
  visit(chart);
  names.add('UNHANDLED');
  return [...names];
}

function guardsOf(chart) {
  const out = new Set();
  JSON.stringify(chart, (k, v) => {
    if ((k === 'guard' || k === 'cond') && v !== undefined) {
      const name = typeof v === 'string' ? v : v.type;
      if (name !== '$below') out.add(name);
    }
    return v;
  });
  return [...out];
}

function fixed(steps) {
  let i = 0;
  return () => (i < steps.length ? steps[i++] : null);
}

function write(file, header, charts) {
  const body = charts.map((c) => JSON.stringify(c)).join(',\n');
  const text = `{${Object.entries(header)
    .map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`)
    .join(',')},"charts":[\n${body}\n]}\n`;
  fs.writeFileSync(path.join(outDir, file), text);
  console.log(`${file}: ${charts.length} charts, ${charts.reduce((n, c) => n + c.steps.length, 0)} steps`);
}

/** Which features a chart uses, for the coverage summary. */
function features(chart) {
  const f = new Set();
  const text = JSON.stringify(chart);
  const visit = (s, parentType, depth) => {
    if (s.type === 'parallel') f.add(parentType === 'parallel' || depth > 0 ? 'nested parallel' : 'parallel root');
    if (s.type === 'parallel' && Object.values(s.states).some((c) => c.type === 'parallel')) f.add('parallel in parallel');
    if (s.type === 'final' && parentType === 'parallel') f.add('final region');
    if (s.always) f.add('always');
    if (s.onDone) f.add('onDone');
    if (s.after) f.add('after');
    for (const k of Object.keys(s.on ?? {})) if (k.includes('*')) f.add('wildcard');
    for (const c of Object.values(s.states ?? {})) visit(c, s.type ?? 'compound', depth + 1);
  };
  visit(chart, undefined, 0);
  if (text.includes('"reenter":true')) f.add('reenter');
  if (/"target":\[/.test(text)) f.add('multi-target');
  if (/"target":"\.[^"]/.test(text)) f.add('.child target');
  if (/"#i_[^".]+\.[^"]/.test(text)) f.add('#id.child target');
  if (/"#i_[^".]+"/.test(text)) f.add('#id target');
  if (/"target":"[a-z]/.test(text)) f.add('sibling target');
  if (text.includes('"#m"')) f.add('root target');
  if (/"guard"/.test(text)) f.add('guard');
  return f;
}

function coverage(entries) {
  const counts = {};
  for (const e of entries) for (const k of features(e.chart)) counts[k] = (counts[k] ?? 0) + 1;
  return Object.fromEntries(Object.entries(counts).sort());
}

fs.mkdirSync(outDir, { recursive: true });
const header = (what) => ({ xstate: xstateVersion, corpus: what });

const repo = repoCharts(repoRoot)
  .map(({ name, chart }, i) => {
    const r = rng(SEED * 1000 + i);
    return entry(name, chart, randomSteps(r, 24, eventsOf(chart), guardsOf(chart)));
  })
  .filter(Boolean);
write('repo.json', header('every chart written out in the repository, with random events'), repo);

const issue = ISSUE_CHARTS.map(({ name, chart, steps }) => entry(name, chart, fixed(steps))).filter(Boolean);
write('issue.json', header('the smallest chart of each difference in issue 12'), issue);

const generated = [];
for (let i = 0; i < GENERATED; i += 1) {
  const seed = SEED * 100000 + i;
  const r = rng(seed);
  const chart = generateChart(r);
  const e = entry(`generated/${i} (seed ${seed})`, chart, randomSteps(r, r.int(6, 16), SENT_EVENTS));
  if (e) generated.push(e);
}
write('generated.json', { ...header(`${GENERATED} random charts, seed ${SEED}`), coverage: coverage(generated) }, generated);
console.log('generated charts per feature:', coverage(generated));

console.log(`recorded ${stats.recorded} charts (${stats.truncated} traces end early on an XState error)`);
if (stats.rejected.length) {
  console.log(`XState rejected ${stats.rejected.length}:`);
  for (const r of stats.rejected) console.log(`  ${r}`);
}

// Runs one chart on XState v5 with a simulated clock and records, after every step, what the
// Rust replay test (machine/tests/xstate_traces.rs) compares: the state value, the active leaf
// paths, the status, the context and the log of the actions that ran during the step.
//
// Both sides implement the chart's named actions and guards the same deterministic way:
// - every action appends its name to the log (`name` + its params as sorted JSON, if any);
// - the action `$inc` also increments `context.count` (an XState `assign`);
// - the guard `$below` passes while `context.count < params.n`;
// - every other guard `g` passes when the event carries `g: true` (XState: `event.g === true`;
//   switchyard: the event data `{ "g": true }`).

import { createMachine, createActor, enqueueActions, SimulatedClock } from 'xstate';

/** JSON with object keys sorted, so both sides print params the same way. */
export function canonical(v) {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

function logEntry(name, params) {
  return params === undefined ? name : `${name}${canonical(params)}`;
}

const TRANSITION_LISTS = ['always', 'onDone'];

/**
 * The chart as XState v5 reads it: switchyard's v4 aliases and defaults spelled out in v5 terms
 * (see the table of differences in docs/STATECHARTS.md).
 */
export function toXState(chart) {
  const c = structuredClone(chart);
  const named = (x) => {
    if (x && typeof x === 'object' && !Array.isArray(x) && !('params' in x)) {
      const { type, ...rest } = x;
      return Object.keys(rest).length ? { type, params: rest } : { type };
    }
    return x;
  };
  const actions = (a) => (Array.isArray(a) ? a.map(named) : named(a));
  const transition = (t) => {
    if (t === null) return {};
    if (typeof t !== 'object' || Array.isArray(t)) return t;
    const out = { ...t };
    if ('cond' in out) {
      out.guard = out.cond;
      delete out.cond;
    }
    if ('internal' in out) {
      if (out.internal === false && !('reenter' in out)) out.reenter = true;
      delete out.internal;
    }
    if ('guard' in out) out.guard = named(out.guard);
    if ('actions' in out) out.actions = actions(out.actions);
    delete out.delay;
    return out;
  };
  const transitions = (t) => (Array.isArray(t) ? t.map(transition) : transition(t));
  const visit = (s) => {
    if (s.states && s.type !== 'parallel' && s.initial === undefined) {
      s.initial = Object.keys(s.states)[0];
    }
    if (s.entry !== undefined) s.entry = actions(s.entry);
    if (s.exit !== undefined) s.exit = actions(s.exit);
    if (s.on) {
      const on = {};
      for (const [ev, t] of Object.entries(s.on)) {
        if (ev === '') s.always = transitions(t);
        else if (ev.startsWith('done.state.')) on[`xstate.${ev}`] = transitions(t);
        else on[ev] = transitions(t);
      }
      s.on = on;
    }
    for (const k of TRANSITION_LISTS) if (s[k] !== undefined) s[k] = transitions(s[k]);
    if (Array.isArray(s.after)) {
      const after = {};
      for (const t of s.after) {
        const key = String(t.delay);
        after[key] = after[key] === undefined ? transition(t) : [].concat(after[key], transition(t));
      }
      s.after = after;
    } else if (s.after) {
      // XState 5.33.3 reads a plain string inside an `after` array as a transition without a
      // target (it spreads the string); spell it out as `{ target }`, which is what it means.
      for (const k of Object.keys(s.after)) {
        const t = transitions(s.after[k]);
        s.after[k] = Array.isArray(t) ? t.map((x) => (typeof x === 'string' ? { target: x } : x)) : t;
      }
    }
    for (const child of Object.values(s.states ?? {})) visit(child);
  };
  visit(c);
  return c;
}

/** Every action and guard name used by a (normalized) chart. */
function names(config) {
  const actions = new Set();
  const guards = new Set();
  const addActions = (a) => {
    for (const x of [].concat(a ?? [])) actions.add(typeof x === 'string' ? x : x.type);
  };
  const addTransitions = (t) => {
    for (const x of [].concat(t ?? [])) {
      if (x && typeof x === 'object') {
        addActions(x.actions);
        if (x.guard !== undefined) guards.add(typeof x.guard === 'string' ? x.guard : x.guard.type);
      }
    }
  };
  const visit = (s) => {
    addActions(s.entry);
    addActions(s.exit);
    for (const t of Object.values(s.on ?? {})) addTransitions(t);
    for (const t of Object.values(s.after ?? {})) addTransitions(t);
    addTransitions(s.always);
    addTransitions(s.onDone);
    for (const child of Object.values(s.states ?? {})) visit(child);
  };
  visit(config);
  return { actions, guards };
}

/** The deterministic implementations described at the top of this file. */
function implementations(config, log) {
  const { actions, guards } = names(config);
  const impl = { actions: {}, guards: {} };
  for (const name of actions) {
    impl.actions[name] =
      name === '$inc'
        ? enqueueActions(({ enqueue }) => {
            enqueue.assign({ count: ({ context }) => (context.count ?? 0) + 1 });
            // A plain function action, so it is logged in order with the others (XState defers
            // plain actions of the initial step until `start`, but not assignments).
            enqueue(() => log.push('$inc'));
          })
        : (_args, params) => log.push(logEntry(name, params));
  }
  for (const name of guards) {
    impl.guards[name] =
      name === '$below'
        ? ({ context }, params) => (context.count ?? 0) < params.n
        : ({ event }) => event[name] === true;
  }
  return impl;
}

function observe(actor, log) {
  const s = actor.getSnapshot();
  return {
    value: s.value,
    leaves: s._nodes
      .filter((n) => n.type === 'atomic' || n.type === 'final')
      .sort((a, b) => a.order - b.order)
      .map((n) => n.path.join('.')),
    status: s.status,
    context: s.context,
    actions: log.splice(0),
  };
}

/** Milliseconds until the earliest pending timer of the clock, if any. */
function nextDue(clock) {
  let best;
  for (const t of clock.timeouts.values()) {
    const end = t.start + t.timeout;
    if (best === undefined || end < best) best = end;
  }
  return best === undefined ? undefined : best - clock.now();
}

/**
 * Runs `chart` on XState. `nextStep(info)` returns the next step (`{ send: event }` or
 * `{ advance: ms }`) or `null` to stop; `info.nextDue` is the time to the earliest timer.
 * Returns `{ steps, error }`: every step with its `expect`ed observation; on an XState error
 * (e.g. an eventless loop) the trace ends before the failing step and `error` says why.
 */
export function record(chart, nextStep, { maxSteps = 64 } = {}) {
  const config = toXState(chart);
  config.options = { maxIterations: 1000 };
  const log = [];
  const machine = createMachine(config, implementations(config, log));
  const clock = new SimulatedClock();
  const actor = createActor(machine, { clock });
  let error;
  actor.subscribe({ error: (e) => (error ??= String(e?.message ?? e)) });
  actor.start();
  const steps = [];
  let obs = observe(actor, log);
  if (obs.status === 'error') return { steps, error: error ?? 'error at start' };
  steps.push({ start: true, expect: obs });
  while (steps.length < maxSteps) {
    const step = nextStep({ nextDue: nextDue(clock), status: obs.status, index: steps.length });
    if (!step) break;
    if (step.send) {
      actor.send(step.send);
    } else {
      // Due time to due time, so a timer started by a firing starts at that firing's due time
      // (SimulatedClock.increment would start it at the end of the whole advance).
      const target = clock.now() + step.advance;
      for (;;) {
        const d = nextDue(clock);
        if (d === undefined || clock.now() + d > target) break;
        clock.set(clock.now() + d);
      }
      clock.set(target);
    }
    obs = observe(actor, log);
    if (obs.status === 'error') return { steps, error: error ?? 'error' };
    steps.push({ ...step, expect: obs });
  }
  return { steps };
}

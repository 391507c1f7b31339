#!/usr/bin/env node
'use strict';
// An intentd agent in Node.js, talking to its sidecar's AgentRuntimeService
// (proto/intentd/v1/runtime.proto) with no SDK and no generated code.
//
// The sidecar says where it listens in INTENTD_SIDECAR_ADDRESS
// (unix:///path/to.sock or 127.0.0.1:PORT); `intentd sidecar --exec "node agent.js"`
// sets it. The agent:
//   1. opens Attach and sends AgentHello;
//   2. for each Assignment: acks it, then runs its steps. Before each step it
//      asks BeginStep whether an earlier attempt recorded it: if so the
//      recorded result is used and the step is NOT run again; otherwise it
//      runs the step and records the result with RecordStep (which returns
//      only after the control plane committed it);
//   3. ends with CompleteIntent (or FailIntent).
// A crash at any point loses nothing that was recorded: the sidecar sees the
// Attach stream drop, the intent is redelivered, and the next attempt resumes
// at the first unrecorded step.
//
// Payload of the example handler (intent type example.node.steps.v1):
//   steps          number of steps (default 3); step i returns i * 10
//   step_ms        how long each step works (default 10)
//   ledger         a file to append one JSON line to when a step starts
//                  ("begin"), so a test can count which steps really ran
//   crash_at       die during this step (after its "begin" line, before its
//                  result is recorded) ...
//   crash_attempts ... on these attempts (default [1])
//   crash_mode     "kill" (SIGKILL itself, default) or "exit" (exit 137)
//   fail           "retryable" or "nonretryable": fail at step fail_at (default 1)
//   wait_for_signal after the steps, wait durably for the signal of this name
//                  (docs/waits.md) and return its payload as "signal"; the
//                  intent parks (WAITING) until the signal comes
//   wait_timeout_ms ... giving up after this long (WAIT_TIMED_OUT, for good)

const fs = require('node:fs');
const path = require('node:path');
const { grpc, load, CHANNEL_OPTIONS, toJsonBytes, fromJsonBytes } = require('./protos');

const SIDECAR = process.env.INTENTD_SIDECAR_ADDRESS || 'unix:///var/run/intentd/agent.sock';
const CAPACITY = Number(process.env.AGENT_CAPACITY || 4);

const pb = load();
const runtime = new pb.AgentRuntimeService(SIDECAR, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);

const log = (msg) => process.stderr.write(`node-agent[${process.pid}]: ${msg}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ runtime calls

class Stopped extends Error {} // the lease was revoked or lost, or the intent parked: stop quietly
class NonRetryableError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function unary(method, request) {
  return new Promise((resolve, reject) => {
    runtime[method](request, { deadline: Date.now() + 30_000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// Writes answer only after the control plane committed them. UNAVAILABLE means
// "not committed": asking again is safe. FAILED_PRECONDITION means the lease is
// stale: stop working on the intent.
async function write(ctx, method, request) {
  for (let delay = 100; ; delay = Math.min(delay * 2, 2000)) {
    if (ctx.stopped) throw new Stopped(ctx.stopped);
    try {
      return await unary(method, { lease: ctx.lease, ...request });
    } catch (err) {
      if (err.code === grpc.status.FAILED_PRECONDITION) {
        ctx.stopped = ctx.stopped || `refused: ${err.details}`;
        throw new Stopped(ctx.stopped);
      }
      if (err.code !== grpc.status.UNAVAILABLE) throw err;
      await sleep(delay);
    }
  }
}

// Takes the next position and asks whether an earlier attempt recorded it
// under this name: the record, or null. Another name there is a divergence.
async function begin(ctx, name) {
  if (ctx.stopped) throw new Stopped(ctx.stopped);
  const index = ++ctx.index;
  let begun;
  try {
    begun = await unary('BeginStep', { lease: ctx.lease, index, name });
  } catch (err) {
    if (err.code === grpc.status.FAILED_PRECONDITION && /divergence/i.test(err.details || '')) {
      throw new NonRetryableError('STEP_DIVERGENCE', err.details);
    }
    if (err.code === grpc.status.FAILED_PRECONDITION) throw new Stopped(err.details);
    throw err;
  }
  if (!begun.recorded) return { index, record: null };
  ctx.replayed += 1;
  return { index, record: begun.step };
}

// One durable step: replayed from the record when an earlier attempt finished
// it, otherwise run and recorded. Names and order must be the same on every
// attempt. Names starting with "@" are the records of waits: not for steps.
async function step(ctx, name, fn) {
  const { index, record } = await begin(ctx, name);
  if (record) return fromJsonBytes(record.result);
  const value = await fn(index);
  await write(ctx, 'RecordStep', { step: { index, name, result: toJsonBytes(value) } });
  return value;
}

// A durable wait for the signal `name` (docs/waits.md, docs/protocol.md
// "Durable waits"). It takes the next position like a step, under the record
// name "@signal:<name>". Recorded (an earlier attempt got it): its value is
// the record's. Otherwise Wait: the sidecar answers once the control plane
// has the signal (resolved, with the record), or when nothing came within the
// intent type's hold window (parked). Parked, the attempt is over: the intent
// is WAITING, the lease is gone and the sidecar already freed our slot, so
// stop the handler and write nothing more; the signal brings a new delivery,
// which replays to this position and finds the record.
async function waitForSignal(ctx, name, timeoutMs) {
  const stepName = `@signal:${name}`;
  const { index, record } = await begin(ctx, stepName);
  let result = record && record.result;
  if (!record) {
    const reply = await write(ctx, 'Wait', {
      wait: { index, step_name: stepName, kind: 'WAIT_KIND_SIGNAL', signal_name: name, timeout_ms: String(timeoutMs || 0) },
    });
    if (reply.outcome.parked) {
      ctx.stopped = `parked on ${stepName}`;
      throw new Stopped(ctx.stopped);
    }
    result = reply.outcome.step.result;
  }
  const value = fromJsonBytes(result);
  // Recorded too: every attempt that reaches this wait times out here again.
  if (value && value.timed_out) throw new NonRetryableError('WAIT_TIMED_OUT', `wait ${index} for the signal ${name} timed out`);
  return value.signal.payload;
}

// ------------------------------------------------------------------ the handler

function ledger(path, entry) {
  if (!path) return;
  // One line, on disk before the step goes on: the ledger is the evidence of
  // what ran, so it must not lose the line of a step about to be killed.
  const fd = fs.openSync(path, 'a');
  try {
    fs.writeSync(fd, `${JSON.stringify({ ...entry, pid: process.pid })}\n`);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function handleSteps(ctx, payload) {
  const steps = Number(payload.steps ?? 3);
  const stepMs = Number(payload.step_ms ?? 10);
  let total = 0;
  for (let i = 1; i <= steps; i++) {
    total += await step(ctx, `step-${i}`, async (index) => {
      ledger(payload.ledger, { intent_id: ctx.intentId, step: index, attempt: ctx.attempt, phase: 'begin' });
      if (payload.crash_at === index && (payload.crash_attempts || [1]).includes(ctx.attempt)) {
        log(`crashing during step ${index} of attempt ${ctx.attempt} as asked`);
        if (payload.crash_mode === 'exit') process.exit(137);
        process.kill(process.pid, 'SIGKILL');
      }
      if (payload.fail && (payload.fail_at ?? 1) === index) {
        if (payload.fail === 'nonretryable') throw new NonRetryableError('BAD_INPUT', `step ${index} cannot work on this payload`);
        throw new Error(`step ${index} failed, try again`);
      }
      await sleep(stepMs);
      return index * 10;
    });
  }
  const result = { total, steps, language: 'node', replayed: ctx.replayed, attempt: ctx.attempt };
  if (payload.wait_for_signal) {
    result.signal = await waitForSignal(ctx, String(payload.wait_for_signal), Number(payload.wait_timeout_ms ?? 0));
  }
  return result;
}

const HANDLERS = { 'example.node.steps.v1': handleSteps };

// More handlers, so other examples reuse this agent (examples/orchestrator/reviewer.js):
// AGENT_HANDLERS lists modules (paths, comma-separated), each exporting
// (lib) => ({ '<intent type>': async (ctx, payload) => result }), where lib
// holds what a handler builds on. Their types are offered with ours.
const LIB = { step, waitForSignal, ledger, log, sleep, NonRetryableError };
for (const file of (process.env.AGENT_HANDLERS || '').split(',').map((s) => s.trim()).filter(Boolean)) {
  Object.assign(HANDLERS, require(path.resolve(file))(LIB));
}
const INTENT_TYPES = (process.env.AGENT_INTENT_TYPES || Object.keys(HANDLERS).join(','))
  .split(',').map((s) => s.trim()).filter(Boolean);

// ------------------------------------------------------------------ session

const running = new Map(); // lease token -> ctx

async function run(assignment) {
  const { intent, lease } = assignment;
  const ctx = {
    lease,
    intentId: intent.id,
    attempt: lease.attempt,
    index: 0,
    replayed: 0,
    stopped: null,
  };
  running.set(lease.token, ctx);
  try {
    const handler = HANDLERS[intent.intent_type];
    if (!handler) throw new NonRetryableError('NO_HANDLER', `no handler for ${intent.intent_type}`);
    log(`${intent.id} attempt ${lease.attempt}: ${assignment.steps.length} steps recorded earlier`);
    const result = await handler(ctx, fromJsonBytes(intent.payload) || {});
    await write(ctx, 'CompleteIntent', { complete: { result: toJsonBytes(result) } });
    log(`${intent.id} completed`);
  } catch (err) {
    if (err instanceof Stopped) {
      log(`${intent.id}: stopped (${err.message})`);
    } else {
      const retryable = !(err instanceof NonRetryableError);
      const code = err instanceof NonRetryableError ? err.code : 'AGENT_ERROR';
      log(`${intent.id}: ${code}: ${err.message}`);
      try {
        await write(ctx, 'FailIntent', { fail: { code, message: String(err.message), retryable } });
      } catch (failErr) {
        log(`${intent.id}: could not report the failure: ${failErr.message}`);
      }
    }
  } finally {
    running.delete(lease.token);
    maybeExit();
  }
}

let draining = false;
let stream = null;

function attach() {
  stream = runtime.Attach({ waitForReady: true });
  stream.on('data', (message) => {
    if (message.msg === 'assignment') {
      const assignment = message.assignment;
      // Acknowledge first: the handler starts now. The sidecar holds any
      // write for this lease until the ack has reached it.
      stream.write({ ack: { lease: assignment.lease } });
      run(assignment);
    } else if (message.msg === 'revocation') {
      const { lease, reason } = message.revocation;
      const ctx = running.get(lease.token);
      if (ctx) ctx.stopped = reason || 'revoked';
      log(`${lease.intent_id}: revoked (${reason})`);
    }
  });
  const ended = (why) => {
    if (stream === null) return;
    stream = null;
    // Whatever was held was released by the sidecar when the stream ended.
    for (const ctx of running.values()) ctx.stopped = ctx.stopped || 'detached';
    if (draining) return maybeExit();
    log(`Attach ended (${why}); reconnecting`);
    setTimeout(attach, 500);
  };
  stream.on('error', (err) => ended(err.details || err.message));
  stream.on('end', () => ended('closed by the sidecar'));
  // fetches_steps: every step asks BeginStep, so recorded steps the
  // assignment does not carry (large histories come in pages) are found too.
  stream.write({ hello: { intent_types: INTENT_TYPES, capacity: CAPACITY, language: 'node', fetches_steps: true } });
  log(`attached to ${SIDECAR} for ${INTENT_TYPES.join(', ')}`);
}

function maybeExit() {
  if (draining && running.size === 0) {
    if (stream) stream.end();
    runtime.close();
    process.exit(0);
  }
}

// The sidecar stops its agent with SIGTERM after its own drain: finish what
// runs (the sidecar SIGKILLs after its grace), then leave.
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    log(`${sig}: finishing ${running.size} intents, then exiting`);
    draining = true;
    maybeExit();
  });
}

attach();

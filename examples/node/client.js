#!/usr/bin/env node
'use strict';
// An intentd client in Node.js: sends one intent with IntentService.SendIntent
// and blocks on WaitIntent until it is terminal, then prints the final intent
// as one line of JSON on stdout.
//
//   node client.js [SERVER] [TO_AGENT] [PAYLOAD_JSON]
//
//   SERVER        control plane HOST:PORT (default $INTENTD_SERVER or 127.0.0.1:7300)
//   TO_AGENT      agent://org/env/name (default agent://example/local/node-agent)
//   PAYLOAD_JSON  the payload (default {"steps": 3})
//
// Environment: INTENT_TYPE (default example.node.steps.v1), WAIT_TIMEOUT_S
// (default 60). Exit status: 0 when the intent COMPLETED, 1 when it ended in
// another state, 2 when it was still running after WAIT_TIMEOUT_S.

const crypto = require('node:crypto');
const { grpc, load, CHANNEL_OPTIONS, toJsonBytes, fromJsonBytes, timestampToIso } = require('./protos');

const server = process.argv[2] || process.env.INTENTD_SERVER || '127.0.0.1:7300';
const toAgent = process.argv[3] || 'agent://example/local/node-agent';
const payload = process.argv[4] ? JSON.parse(process.argv[4]) : { steps: 3 };
const intentType = process.env.INTENT_TYPE || 'example.node.steps.v1';
const waitTimeoutMs = Number(process.env.WAIT_TIMEOUT_S || 60) * 1000;

const TERMINAL = new Set([
  'INTENT_STATE_COMPLETED',
  'INTENT_STATE_FAILED',
  'INTENT_STATE_CANCELED',
  'INTENT_STATE_TIMED_OUT',
]);
// Not committed, or not answered in time: safe to ask again.
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);

const pb = load();
const client = new pb.IntentService(server, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);

function call(method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function withRetries(what, fn, until) {
  for (let delay = 100; ; delay = Math.min(delay * 2, 2000)) {
    try {
      return await fn();
    } catch (err) {
      if (!RETRYABLE.has(err.code) || Date.now() + delay > until) throw err;
      process.stderr.write(`client: ${what}: ${err.details || err.message}; retrying\n`);
      await sleep(delay);
    }
  }
}

function summary(intent) {
  return {
    id: intent.id,
    intent_type: intent.intent_type,
    to_agent: intent.to_agent,
    state: intent.state.replace(/^INTENT_STATE_/, ''),
    attempt: intent.attempt,
    max_attempts: intent.max_attempts,
    steps_completed: intent.checkpoint ? intent.checkpoint.steps_completed : 0,
    payload: fromJsonBytes(intent.payload),
    result: fromJsonBytes(intent.result),
    error: intent.error && intent.error.code ? { code: intent.error.code, message: intent.error.message } : null,
    create_time: timestampToIso(intent.create_time),
    finish_time: timestampToIso(intent.finish_time),
  };
}

async function main() {
  const until = Date.now() + waitTimeoutMs;
  // One key for every try: a retried send after UNAVAILABLE matches the first
  // one instead of creating a second intent.
  const idempotencyKey = crypto.randomUUID();
  const sent = await withRetries('SendIntent', () => call('SendIntent', {
    intent: {
      intent_type: intentType,
      to_agent: toAgent,
      payload: toJsonBytes(payload),
      idempotency_key: idempotencyKey,
      sender: 'examples/node/client.js',
    },
  }, 10_000), until);
  const id = sent.intent.id;
  process.stderr.write(`client: sent ${id} (${intentType} to ${toAgent})\n`);

  // WaitIntent answers when the intent is terminal or its own timeout passed;
  // ask again until ours has.
  let intent = sent.intent;
  while (!TERMINAL.has(intent.state)) {
    const left = until - Date.now();
    if (left <= 0) break;
    const waitMs = Math.min(left, 10_000);
    const reply = await withRetries('WaitIntent', () => call('WaitIntent', {
      id,
      timeout_ms: String(waitMs),
    }, waitMs + 5_000), until);
    intent = reply.intent;
  }
  console.log(JSON.stringify(summary(intent)));
  if (!TERMINAL.has(intent.state)) return 2;
  return intent.state === 'INTENT_STATE_COMPLETED' ? 0 : 1;
}

main().then(
  (code) => {
    client.close();
    process.exitCode = code;
  },
  (err) => {
    client.close();
    process.stderr.write(`client: ${err.code !== undefined ? `${grpc.status[err.code]}: ${err.details}` : err.stack}\n`);
    process.exitCode = 1;
  },
);

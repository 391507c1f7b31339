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
//
// Or reads one of an intent's streams (IntentService.StreamIntent) until the
// intent is terminal, printing one JSON line per entry and a last line
// {"end": "<state>"}:
//
//   node client.js stream INTENT_ID [STREAM] [FROM_OFFSET]
//
//   STREAM        the stream's name (default "default")
//   FROM_OFFSET   the first offset (default 0)
//
// The server is $INTENTD_SERVER (default 127.0.0.1:7300); STREAM_SKIP_SUPERSEDED=1
// asks the server to leave out chunks a marker already supersedes. Exit status
// as above (0: COMPLETED).

const crypto = require('node:crypto');
const { grpc, load, CHANNEL_OPTIONS, toJsonBytes, fromJsonBytes, timestampToIso } = require('./protos');

const streamCommand = process.argv[2] === 'stream';
const server = (!streamCommand && process.argv[2]) || process.env.INTENTD_SERVER || '127.0.0.1:7300';
const toAgent = (!streamCommand && process.argv[3]) || 'agent://example/local/node-agent';
const payload = !streamCommand && process.argv[4] ? JSON.parse(process.argv[4]) : { steps: 3 };
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

// One StreamIntent call from `from`: resolves with the final intent, or with
// null when the call ended without it (a server going away may end calls so);
// rejects with the call's error. Each new entry is handed to onEntry.
function streamOnce(request, onEntry) {
  return new Promise((resolve, reject) => {
    let final = null;
    const call = client.StreamIntent(request);
    call.on('data', (reply) => {
      for (const entry of reply.entries) onEntry(entry);
      if (reply.intent) final = reply.intent;
    });
    call.on('error', reject);
    call.on('end', () => resolve(final));
  });
}

const FORMATS = { CHUNK_FORMAT_JSON: 'json', CHUNK_FORMAT_TEXT: 'text', CHUNK_FORMAT_UNSPECIFIED: 'text' };

function entryLine(entry) {
  const line = { offset: Number(entry.offset), attempt: entry.attempt, position: entry.position };
  if (entry.superseded) {
    // A marker: the chunks at a lower offset at these positions are superseded.
    line.superseded = {
      positions: entry.superseded.positions,
      reason: entry.superseded.reason.replace(/^SUPERSEDE_REASON_/, ''),
    };
    return line;
  }
  const data = Buffer.from(entry.data || []).toString('utf8');
  line.format = FORMATS[entry.format] || null;
  line.data = line.format === 'json' ? JSON.parse(data) : data;
  return line;
}

async function stream(id, name, fromOffset) {
  // The offset after the last entry printed: a reconnect after UNAVAILABLE
  // resumes there, so nothing is skipped or printed twice.
  let next = fromOffset;
  let failures = 0;
  for (;;) {
    const request = {
      id,
      stream: name,
      from_offset: String(next),
      skip_superseded: process.env.STREAM_SKIP_SUPERSEDED === '1',
    };
    try {
      const intent = await streamOnce(request, (entry) => {
        const offset = Number(entry.offset);
        if (offset < next) return; // a replay overlapping what was printed
        next = offset + 1;
        failures = 0; // progress: the next outage gets the full budget
        console.log(JSON.stringify(entryLine(entry)));
      });
      if (intent) {
        const state = intent.state.replace(/^INTENT_STATE_/, '');
        console.log(JSON.stringify({ end: state }));
        return state === 'COMPLETED' ? 0 : 1;
      }
      if (failures >= 8) throw new Error('the server ended the stream before the intent\'s end');
    } catch (err) {
      if (err.code !== grpc.status.UNAVAILABLE || failures >= 8) throw err;
      process.stderr.write(`client: StreamIntent: ${err.details || err.message}; resuming at offset ${next}\n`);
    }
    await sleep(Math.min(100 * 2 ** failures, 2000));
    failures += 1;
  }
}

function run() {
  if (!streamCommand) return main();
  const id = process.argv[3];
  if (!id) {
    process.stderr.write('usage: node client.js stream INTENT_ID [STREAM] [FROM_OFFSET]\n');
    return Promise.resolve(2);
  }
  return stream(id, process.argv[4] || 'default', Number(process.argv[5] || 0));
}

run().then(
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

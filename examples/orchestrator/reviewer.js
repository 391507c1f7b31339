'use strict';
// The reviewer agent of the orchestrator example, in Node.js: a handler for
// intent.example.review.v1, run by the Node example's agent
// (examples/node/agent.js), which loads it through AGENT_HANDLERS:
//
//   AGENT_HANDLERS=examples/orchestrator/reviewer.js \
//     intentd sidecar --server 127.0.0.1:7300 --address agent://example/local/reviewer \
//       --exec "node examples/node/agent.js"
//
// The orchestrator calls it with ctx.call(...): to this agent that is an
// intent like any other (it cannot tell a child from an intent a client
// sent). Two durable steps: each is replayed from its record after a crash,
// never run twice once recorded.
//
// Payload: {"topic", "research": {...}, "code": {...}}; the research and
// code are what the research and coding agents returned.
//   crash_at  die during this step (1 or 2) on the first attempt, to see the
//             reviewer resume while the orchestrator waits, parked

module.exports = ({ step, ledger, log }) => ({
  'intent.example.review.v1': async (ctx, payload) => {
    const findings = await step(ctx, 'read', async (index) => {
      ledger(payload.ledger, { intent_id: ctx.intentId, step: index, attempt: ctx.attempt, phase: 'begin' });
      if (payload.crash_at === index && ctx.attempt === 1) {
        log(`reviewer: crashing during step ${index} as asked`);
        process.kill(process.pid, 'SIGKILL');
      }
      const notes = [];
      const sources = (payload.research && payload.research.sources) || [];
      const lines = (payload.code && payload.code.lines) || 0;
      notes.push(sources.length ? `research cites ${sources.length} sources` : 'research cites nothing');
      notes.push(lines > 0 ? `code has ${lines} lines` : 'no code to review');
      return { notes, sources: sources.length, lines };
    });
    const verdict = await step(ctx, 'decide', async (index) => {
      ledger(payload.ledger, { intent_id: ctx.intentId, step: index, attempt: ctx.attempt, phase: 'begin' });
      if (payload.crash_at === index && ctx.attempt === 1) process.kill(process.pid, 'SIGKILL');
      return findings.sources > 0 && findings.lines > 0 ? 'approve' : 'request-changes';
    });
    return { verdict, notes: findings.notes, reviewer: 'node', topic: payload.topic || null, attempt: ctx.attempt };
  },
});

'use strict';
// Loads the intentd contracts at run time: no generated code, the .proto files
// in ../../proto are the only source of truth.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

// google/protobuf/*.proto (timestamp.proto here) are bundled with protobufjs,
// which proto-loader uses; the directory is listed so that an import of any
// of them resolves even where the bundle does not carry it.
function googleProtoDirs() {
  try {
    return [path.dirname(require.resolve('protobufjs/package.json'))];
  } catch {
    return [];
  }
}

const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto files (intent_type, not intentType)
  longs: String, // int64 (timeout_ms, seq) as decimal strings: no precision loss
  enums: String, // "INTENT_STATE_COMPLETED" rather than 5
  defaults: true,
  oneofs: true, // a oneof's case is in message.msg ("assignment", "revocation", ...)
  includeDirs: [PROTO_ROOT, ...googleProtoDirs()],
};

let cached = null;

function load() {
  if (cached === null) {
    const definition = protoLoader.loadSync(
      ['intentd/v1/intent_service.proto', 'intentd/v1/runtime.proto'],
      LOADER_OPTIONS,
    );
    cached = grpc.loadPackageDefinition(definition).intentd.v1;
  }
  return cached;
}

const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
};

// Payloads, results and step results are UTF-8 JSON in bytes fields.
function toJsonBytes(value) {
  return Buffer.from(JSON.stringify(value === undefined ? null : value), 'utf8');
}

function fromJsonBytes(bytes) {
  if (!bytes || bytes.length === 0) return null;
  return JSON.parse(Buffer.from(bytes).toString('utf8'));
}

function timestampToIso(ts) {
  if (!ts || (Number(ts.seconds) === 0 && !ts.nanos)) return null;
  return new Date(Number(ts.seconds) * 1000 + Math.floor((ts.nanos || 0) / 1e6)).toISOString();
}

module.exports = {
  grpc,
  load,
  CHANNEL_OPTIONS,
  PROTO_ROOT,
  toJsonBytes,
  fromJsonBytes,
  timestampToIso,
};

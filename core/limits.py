"""The one table of limits on what clients, agents and sidecars send.

Every layer reads them from here: the client SDK and the agent SDK check early
(friendlier failures), the server checks again before a write joins a batch,
so a bad value is refused alone with its field named instead of failing a
statement shared with other tenants. Text limits are in characters, sizes in
bytes.
"""

from __future__ import annotations

MAX_TYPE_LEN = 200
MAX_ADDRESS_LEN = 300
# Intent types one agent, or one sidecar stream, may name.
MAX_INTENT_TYPES = 1000
MAX_KEY_LEN = 200
MAX_SENDER_LEN = 200
MAX_SIDECAR_ID_LEN = 200
MAX_LABELS = 64
MAX_LABEL_KEY_LEN = 63
MAX_LABEL_VALUE_LEN = 256
MAX_JSON_DEPTH = 64
MAX_REASON_LEN = 1000  # a cancel reason
MAX_STEP_NAME_LEN = 200
MAX_PROGRESS_MESSAGE_LEN = 1000
MAX_FAIL_CODE_LEN = 100
MAX_FAIL_MESSAGE_LEN = 4000  # longer failure messages are cut, not refused
# Deadlines and delays further ahead than this are mistakes (and past year
# 9999 a timestamp cannot be read back into Python or protobuf at all); the
# database holds the same bound as a CHECK (migration 0006).
MAX_HORIZON_MS = 100 * 366 * 86_400_000
MAX_RETRY_BACKOFF_MS = 3_600_000
MAX_RETRY_BACKOFF_MAX_MS = 86_400_000


# Attempts one intent may be given.
MAX_ATTEMPTS_LIMIT = 1000

# Durable waits (docs/waits.md).
# Signal names and signal ids: 1..128 characters of [A-Za-z0-9_.:-].
MAX_SIGNAL_NAME_LEN = 128
MAX_SIGNAL_ID_LEN = 128
# Signals kept in one intent's inbox, not yet taken by a wait, and the bytes
# of their payloads (each also within the tenant's payload limit).
MAX_INBOX_SIGNALS = 1000
MAX_INBOX_BYTES = 4 * 1024 * 1024
MAX_TASK_TITLE_LEN = 200
MAX_TASK_DESCRIPTION_LEN = 10_000
MAX_TASK_OUTCOMES = 20
MAX_TASK_OUTCOME_LEN = 64
MAX_TASK_ASSIGNEES = 100
MAX_TASK_FORM_SCHEMA_BYTES = 64 * 1024
MAX_TASK_COMMENT_LEN = 4096
# Child intents (docs/children.md): children started at one position (one
# statement), and children one gather or first waits for.
MAX_CHILDREN_PER_START = 1000
MAX_CHILDREN_PER_WAIT = 1000
# The hold window of an attempt that reached an unsatisfied wait.
DEFAULT_WAIT_HOLD_MS = 2000
MAX_WAIT_HOLD_MS = 30_000
# Streams (docs/streams.md). Stream names: 1..64 characters of [A-Za-z0-9_.:-].
DEFAULT_STREAM = "default"
MAX_STREAM_NAME_LEN = 64
MAX_STREAMS_PER_INTENT = 16  # also a CHECK on intents.stream_names (migration 0012)
MAX_CHUNK_BYTES = 64 * 1024
# One EmitWrite: its chunks and their bytes (an agent SDK flushes before either).
MAX_EMIT_CHUNKS = 4096
MAX_EMIT_BYTES = 1024 * 1024
# One StreamIntentResponse: its entries and (about) their bytes.
MAX_STREAM_PAGE_ENTRIES = 4096
MAX_STREAM_PAGE_BYTES = 1024 * 1024
# The server's defaults per intent (ServerSettings.stream_max_bytes,
# stream_max_chunks_per_s).
DEFAULT_STREAM_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_STREAM_MAX_CHUNKS_PER_S = 50_000

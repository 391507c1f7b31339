-- The size of an intent's recorded history, so it can be paged and bounded.
--
-- Recorded steps reach a resumed attempt in pages cut by bytes, and every
-- intent has a history limit (INTENTD_MAX_HISTORY_BYTES / _STEPS) that the
-- step-recording statement enforces. Both need sizes without reading the
-- results: each step keeps its own (the bytes of its name and of its result
-- as the server sends it, jsonb's text), each intent the sum of its steps'.

ALTER TABLE intent_steps ADD COLUMN size_bytes integer NOT NULL DEFAULT 0 CHECK (size_bytes >= 0);
UPDATE intent_steps SET size_bytes = octet_length(result::text) + octet_length(name);

ALTER TABLE intents ADD COLUMN history_bytes bigint NOT NULL DEFAULT 0 CHECK (history_bytes >= 0);
UPDATE intents i SET history_bytes = s.total
FROM (SELECT intent_id, sum(size_bytes) AS total FROM intent_steps GROUP BY intent_id) s
WHERE i.id = s.intent_id;

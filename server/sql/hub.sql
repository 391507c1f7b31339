-- Named queries of the notification hub.

-- name: intents_last_seq
-- The catch-up of subscribers that may have missed a notification: the newest
-- event seq of each watched intent (a missing row: the intent is gone).
-- $1 intent ids
SELECT id, last_seq FROM intents WHERE id = ANY($1::text[]);

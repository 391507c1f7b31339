-- Room on each heap page of intents for updated row versions.
--
-- An intent row is rewritten at every change of its life (claim, ack, each
-- step, checkpoint, progress, completion, every lease renewal). With full
-- pages each new version lands on another page, and every index of the
-- table (nine) gets an entry for it. With free space on the page, an update
-- that changes no indexed column (a step, a checkpoint, progress) is a HOT
-- update: same page, no index entries, and the old version is pruned in
-- place. Applies to pages written from now on.

ALTER TABLE intents SET (fillfactor = 70);

-- A run's events are only ever read by run, in order (`run_id = $1 ... ORDER
-- BY seq`): their key becomes (run_id, seq), the index those reads already
-- used, and the index of `seq` alone goes. It was read by nothing and
-- written at every event, two per transition (#14 item 12; BENCHMARKS.md
-- run 11). `seq` still numbers every event once, from its sequence.
ALTER TABLE run_events DROP CONSTRAINT run_events_pkey;
DROP INDEX run_events_run;
ALTER TABLE run_events ADD CONSTRAINT run_events_pkey PRIMARY KEY (run_id, seq);

-- A flow's end: its record (the start's, or its own when the start was not reported)
-- holds its totals (controlplane/src/store/flows.rs).
ALTER TABLE flows ADD COLUMN ended INTEGER NOT NULL DEFAULT 0;

-- Flow records the agents report (controlplane/src/store/flows.rs), pruned by age and
-- count. Addresses in their text form; times in Unix ms (the agent's, clamped to the
-- time the record arrived).
CREATE TABLE flows (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    direction INTEGER NOT NULL,
    verdict INTEGER NOT NULL,
    protocol INTEGER NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    src_port INTEGER NOT NULL,
    dst_port INTEGER NOT NULL,
    rule_id TEXT NOT NULL,
    packets BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
CREATE INDEX flows_at ON flows (at_ms);
-- The other end of a flow is looked up by its addresses and ports.
CREATE INDEX flows_tuple ON flows (src, dst, dst_port, src_port);
-- Records refused per node (over its rate, or invalid), summed over every server.
CREATE TABLE flows_refused (
    node TEXT PRIMARY KEY,
    over_rate BIGINT NOT NULL,
    invalid BIGINT NOT NULL
);

-- What the agents' rule counters counted (RuleHits), summed over nodes per rule and minute
-- (controlplane/src/store/usage.rs); pruned with the flow records, by age.
CREATE TABLE rule_usage (
    rule_id TEXT NOT NULL,
    minute_ms BIGINT NOT NULL,
    packets BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (rule_id, minute_ms)
);

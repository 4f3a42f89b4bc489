-- Every versioned change, in version order: what a server that did not make it applies to
-- reach the same state (replicas on PostgreSQL; on SQLite the log is kept the same way).
CREATE TABLE changes (version INTEGER PRIMARY KEY, body TEXT NOT NULL);
-- Overlay addresses ever allocated (removed nodes' included), one owner each: two servers
-- allocating at once cannot hand out the same address.
CREATE TABLE addresses (address TEXT PRIMARY KEY, node TEXT NOT NULL);
INSERT INTO addresses (address, node)
    SELECT json_each.value, nodes.id FROM nodes, json_each(nodes.addresses) WHERE true
    ON CONFLICT DO NOTHING;

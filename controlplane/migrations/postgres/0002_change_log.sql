-- Every versioned change, in version order: what a replica that did not make it applies
-- to reach the same state.
CREATE TABLE changes (version BIGINT PRIMARY KEY, body TEXT NOT NULL);
-- Overlay addresses ever allocated (removed nodes' included), one owner each: two replicas
-- allocating at once cannot hand out the same address.
CREATE TABLE addresses (address TEXT PRIMARY KEY, node TEXT NOT NULL);
INSERT INTO addresses (address, node)
    SELECT a.value, nodes.id FROM nodes, json_array_elements_text(nodes.addresses::json) AS a(value)
    ON CONFLICT DO NOTHING;

-- Credential changes numbered in commit order (the counter row is locked until the
-- change commits): a server reloads only the nodes changed since its last reload.
ALTER TABLE nodes ADD COLUMN credential_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX nodes_credential_seq ON nodes (credential_seq);
CREATE TABLE credential_counter (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL);
INSERT INTO credential_counter (id, seq) VALUES (1, 0);

-- The schema as of the first versioned migration. Databases made before versioned
-- migrations have these tables already; store::legacy gives them the columns added since,
-- so every statement here must leave an existing table as it is.
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT INTO counter (id, version) VALUES (1, 1) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    public_key BLOB NOT NULL,
    addresses TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    routes TEXT NOT NULL,
    tags TEXT NOT NULL,
    credential_hash BLOB NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0,
    applied_version INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_seen INTEGER NOT NULL DEFAULT 0,
    granted_routes TEXT NOT NULL DEFAULT '[]',
    bound INTEGER NOT NULL DEFAULT 0,
    pending_credential_hash BLOB,
    rotate_requested INTEGER NOT NULL DEFAULT 0,
    claimed_hostname TEXT NOT NULL DEFAULT '',
    pending_public_key BLOB
);
CREATE TABLE IF NOT EXISTS enrollment_keys (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL,
    single_use INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    expires INTEGER NOT NULL,
    tags TEXT NOT NULL,
    routes TEXT NOT NULL DEFAULT '[]',
    uses INTEGER NOT NULL DEFAULT 0,
    max_uses INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    hostname TEXT NOT NULL DEFAULT '',
    created INTEGER NOT NULL DEFAULT 0,
    node TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS incarnation (id INTEGER PRIMARY KEY CHECK (id = 1), value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policy (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    file_name TEXT NOT NULL,
    source TEXT NOT NULL,
    version INTEGER NOT NULL
);
-- A bound name belongs to one node (live or removed) at a time.
CREATE UNIQUE INDEX IF NOT EXISTS bound_names ON nodes (hostname) WHERE bound = 1;
-- Peer statistics are kept in memory (registry::observed).
DROP TABLE IF EXISTS peer_stats;

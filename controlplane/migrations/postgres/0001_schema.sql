-- The same tables as SQLite's first migration, in PostgreSQL's types: every statement of
-- the store runs unchanged on both (flags are integers 0/1, lists JSON text). The columns
-- single_use, used and last_seen are only kept for the SQLite databases of older builds;
-- they are here so that one INSERT fits both.
CREATE TABLE counter (id BIGINT PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
INSERT INTO counter (id, version) VALUES (1, 1);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    public_key BYTEA NOT NULL,
    addresses TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    routes TEXT NOT NULL,
    tags TEXT NOT NULL,
    credential_hash BYTEA NOT NULL,
    removed BIGINT NOT NULL DEFAULT 0,
    applied_version BIGINT NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_seen BIGINT NOT NULL DEFAULT 0,
    granted_routes TEXT NOT NULL DEFAULT '[]',
    bound BIGINT NOT NULL DEFAULT 0,
    pending_credential_hash BYTEA,
    rotate_requested BIGINT NOT NULL DEFAULT 0,
    claimed_hostname TEXT NOT NULL DEFAULT '',
    pending_public_key BYTEA
);
CREATE TABLE enrollment_keys (
    id TEXT PRIMARY KEY,
    hash BYTEA NOT NULL,
    single_use BIGINT NOT NULL,
    used BIGINT NOT NULL DEFAULT 0,
    expires BIGINT NOT NULL,
    tags TEXT NOT NULL,
    routes TEXT NOT NULL DEFAULT '[]',
    uses BIGINT NOT NULL DEFAULT 0,
    max_uses BIGINT NOT NULL DEFAULT 0,
    revoked BIGINT NOT NULL DEFAULT 0,
    hostname TEXT NOT NULL DEFAULT '',
    created BIGINT NOT NULL DEFAULT 0,
    node TEXT NOT NULL DEFAULT ''
);
CREATE TABLE incarnation (id BIGINT PRIMARY KEY CHECK (id = 1), value TEXT NOT NULL);
CREATE TABLE policy (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    file_name TEXT NOT NULL,
    source TEXT NOT NULL,
    version BIGINT NOT NULL
);
CREATE UNIQUE INDEX bound_names ON nodes (hostname) WHERE bound = 1;

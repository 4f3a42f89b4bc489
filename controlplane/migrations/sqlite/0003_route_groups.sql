-- The route groups' primaries as the elector last set them: a server that loads the
-- whole state gets the same primaries as those that followed the log.
CREATE TABLE primaries (prefix TEXT PRIMARY KEY, node TEXT NOT NULL);
-- What each server observes of the members (see controlplane/src/election): the elector
-- merges the rows of every server that shared recently.
CREATE TABLE member_observations (
    server TEXT NOT NULL,
    node TEXT NOT NULL,
    prefix TEXT NOT NULL,
    stream INTEGER NOT NULL,
    healthy INTEGER NOT NULL,
    checked INTEGER NOT NULL,
    priority BIGINT NOT NULL,
    tunnel INTEGER NOT NULL,
    PRIMARY KEY (server, node, prefix)
);
-- When each server last shared its observations (database clock, ms).
CREATE TABLE observers (server TEXT PRIMARY KEY, shared_ms BIGINT NOT NULL);
-- The one server that elects primaries, while its lease runs (database clock, ms).
CREATE TABLE elector (id INTEGER PRIMARY KEY, server TEXT NOT NULL, until_ms BIGINT NOT NULL);

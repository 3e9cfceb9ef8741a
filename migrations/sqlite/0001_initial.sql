-- Keys, ledger, stock and audit log. Times are microseconds since the Unix epoch (UTC), so that
-- they compare and sort correctly as integers; ids are UUIDv7 text, so they sort by time.

CREATE TABLE idem_keys (
    user_name      TEXT    NOT NULL,
    idem_key       TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    fingerprint    TEXT    NOT NULL,
    canonical      TEXT    NOT NULL,
    transaction_id TEXT,
    result         TEXT,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    replay_count   INTEGER NOT NULL DEFAULT 0,
    last_replay_at INTEGER,
    PRIMARY KEY (user_name, idem_key)
) WITHOUT ROWID;

CREATE INDEX idem_keys_expires_at ON idem_keys (expires_at);

CREATE TABLE ledger (
    id          TEXT    NOT NULL PRIMARY KEY,
    kind        TEXT    NOT NULL CHECK (kind IN ('receive', 'ship', 'transfer', 'adjust')),
    sku         TEXT    NOT NULL,
    qty         INTEGER NOT NULL,
    location    TEXT    NOT NULL,
    to_location TEXT,
    reference   TEXT,
    reason      TEXT,
    user_name   TEXT    NOT NULL,
    idem_key    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE INDEX ledger_key ON ledger (user_name, idem_key);
CREATE INDEX ledger_sku ON ledger (sku);
CREATE INDEX ledger_created_at ON ledger (created_at);

CREATE TABLE stock (
    sku      TEXT    NOT NULL,
    location TEXT    NOT NULL,
    on_hand  INTEGER NOT NULL CHECK (on_hand >= 0),
    PRIMARY KEY (sku, location)
) WITHOUT ROWID;

CREATE TABLE audit_log (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    at             INTEGER NOT NULL,
    action         TEXT    NOT NULL,
    actor          TEXT    NOT NULL,
    idem_key       TEXT,
    transaction_id TEXT,
    detail         TEXT    NOT NULL DEFAULT ''
);

CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_action_at ON audit_log (action, at);

-- The ledger is append-only.
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;

CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;

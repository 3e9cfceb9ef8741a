-- Keys, ledger, stock and audit log.

CREATE TABLE idem_keys (
    user_name      TEXT        NOT NULL,
    idem_key       TEXT        NOT NULL,
    kind           TEXT        NOT NULL,
    fingerprint    TEXT        NOT NULL,
    canonical      TEXT        NOT NULL,
    transaction_id UUID,
    result         TEXT,
    created_at     TIMESTAMPTZ NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    replay_count   BIGINT      NOT NULL DEFAULT 0,
    last_replay_at TIMESTAMPTZ,
    PRIMARY KEY (user_name, idem_key)
);

CREATE INDEX idem_keys_expires_at ON idem_keys (expires_at);

CREATE TABLE ledger (
    id          UUID        NOT NULL PRIMARY KEY,
    kind        TEXT        NOT NULL CHECK (kind IN ('receive', 'ship', 'transfer', 'adjust')),
    sku         TEXT        NOT NULL,
    qty         BIGINT      NOT NULL,
    location    TEXT        NOT NULL,
    to_location TEXT,
    reference   TEXT,
    reason      TEXT,
    user_name   TEXT        NOT NULL,
    idem_key    TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE INDEX ledger_key ON ledger (user_name, idem_key);
CREATE INDEX ledger_sku ON ledger (sku);
CREATE INDEX ledger_created_at ON ledger (created_at);

CREATE TABLE stock (
    sku      TEXT   NOT NULL,
    location TEXT   NOT NULL,
    on_hand  BIGINT NOT NULL CHECK (on_hand >= 0),
    PRIMARY KEY (sku, location)
);

CREATE TABLE audit_log (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             TIMESTAMPTZ NOT NULL,
    action         TEXT        NOT NULL,
    actor          TEXT        NOT NULL,
    idem_key       TEXT,
    transaction_id UUID,
    detail         TEXT        NOT NULL DEFAULT ''
);

CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_action_at ON audit_log (action, at);

-- The ledger is append-only.
CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only';
END;
$$;

CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

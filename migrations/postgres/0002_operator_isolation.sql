-- Operator isolation, enforced by the database for every client, psql included.
--
-- An operator is a login role that is a member of wms_operator: it sees, replays and claims
-- only the keys whose user_name is its own role name, appends ledger rows and audit entries
-- only under that name, and reads only its own audit entries. The ledger and stock are the
-- warehouse's shared record and stay readable by every operator.
--
-- An administrator sees and does everything, cleanup included: a member of wms_admin, a
-- superuser, a role with BYPASSRLS, or the owner of the tables (the role that migrates).
--
-- Roles belong to the whole server, not to one database, so they are created only if missing;
-- creating them needs CREATEROLE, and a DBA who would rather not grant that to the migrating
-- role creates both roles beforehand (see docs/operators.md).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'wms_operator') THEN
        CREATE ROLE wms_operator NOLOGIN;
    END IF;
EXCEPTION
    -- Another database on this server was migrated at the same moment.
    WHEN duplicate_object OR unique_violation THEN NULL;
END;
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'wms_admin') THEN
        CREATE ROLE wms_admin NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END;
$$;

-- Least privilege: no operator deletes a key (cleanup is for administrators), and nobody
-- updates or deletes the ledger (its trigger refuses that even to the owner).
GRANT SELECT ON _sqlx_migrations TO wms_operator, wms_admin;
GRANT SELECT, INSERT, UPDATE ON idem_keys TO wms_operator;
GRANT SELECT, INSERT, UPDATE, DELETE ON idem_keys TO wms_admin;
GRANT SELECT, INSERT ON ledger TO wms_operator, wms_admin;
GRANT SELECT, INSERT, UPDATE ON stock TO wms_operator, wms_admin;
GRANT SELECT, INSERT ON audit_log TO wms_operator, wms_admin;

-- `(SELECT ...)` makes the membership check an init plan, evaluated once per statement rather
-- than once per row.
ALTER TABLE idem_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY idem_keys_own ON idem_keys
    USING (user_name = current_user OR (SELECT pg_has_role(current_user, 'wms_admin', 'USAGE')))
    WITH CHECK (user_name = current_user OR (SELECT pg_has_role(current_user, 'wms_admin', 'USAGE')));

ALTER TABLE ledger ENABLE ROW LEVEL SECURITY;
CREATE POLICY ledger_read ON ledger FOR SELECT USING (true);
CREATE POLICY ledger_append_own ON ledger FOR INSERT
    WITH CHECK (user_name = current_user OR (SELECT pg_has_role(current_user, 'wms_admin', 'USAGE')));

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY audit_log_own ON audit_log
    USING (actor = current_user OR (SELECT pg_has_role(current_user, 'wms_admin', 'USAGE')))
    WITH CHECK (actor = current_user OR (SELECT pg_has_role(current_user, 'wms_admin', 'USAGE')));

//! The session's standing under operator isolation, and making a role an operator; see
//! [`crate::access`].

use sqlx::Row;

use super::{PgStore, map_err};
use crate::access::{ADMIN_ROLE, OPERATOR_ROLE, OperatorGrant, SessionRole, quote_ident};
use crate::error::Result;
use crate::key::Operator;

impl PgStore {
    pub(crate) async fn session_role(&self) -> Result<SessionRole> {
        // `row_security_active` is false exactly for the roles the policies do not apply to:
        // superusers, BYPASSRLS roles and the table owner.
        let row = sqlx::query(
            "SELECT current_user::text, NOT row_security_active('idem_keys') \
                    OR COALESCE(pg_has_role(current_user, to_regrole($1), 'USAGE'), false)",
        )
        .bind(ADMIN_ROLE)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err("reading the session's role"))?;
        let map = map_err("reading the session's role");
        Ok(SessionRole {
            name: row.try_get(0).map_err(&map)?,
            administrator: row.try_get(1).map_err(&map)?,
        })
    }

    pub(crate) async fn grant_operator(&self, name: &Operator) -> Result<OperatorGrant> {
        let map = map_err("granting an operator role");
        let role = quote_ident(name.as_str());
        let mut tx = self.pool.begin().await.map_err(&map)?;
        let (exists, member): (bool, bool) = sqlx::query_as(
            "SELECT r.oid IS NOT NULL, \
                    COALESCE(pg_has_role(r.oid, to_regrole($2), 'MEMBER'), false) \
             FROM (SELECT $1::text AS name) n LEFT JOIN pg_roles r ON r.rolname = n.name",
        )
        .bind(name.as_str())
        .bind(OPERATOR_ROLE)
        .fetch_one(&mut *tx)
        .await
        .map_err(&map)?;
        if !exists {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN")))
                .execute(&mut *tx)
                .await
                .map_err(&map)?;
        }
        if !member {
            let grant = format!("GRANT {} TO {role}", quote_ident(OPERATOR_ROLE));
            sqlx::query(sqlx::AssertSqlSafe(grant)).execute(&mut *tx).await.map_err(&map)?;
        }
        tx.commit().await.map_err(&map)?;
        tracing::debug!(
            role = name.as_str(),
            created = !exists,
            granted = !member,
            "operator role"
        );
        Ok(OperatorGrant { created: !exists, granted: !member })
    }
}

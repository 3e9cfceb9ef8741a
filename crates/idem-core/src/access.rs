//! Operator isolation: on PostgreSQL the database itself keeps each operator to their own keys
//! (row-level security, migration `0002_operator_isolation`), so that a role can neither see
//! nor consume another operator's keys through wmsctl, psql or any other client. This module
//! names the roles involved and describes the session's standing; the rules are in the
//! migration. A SQLite database has no roles: whoever may write the file is trusted with it.

use serde::Serialize;

/// The group role whose members may post, each only under their own role name.
pub const OPERATOR_ROLE: &str = "wms_operator";

/// The group role whose members see every operator's keys and may act for them and clean up.
pub const ADMIN_ROLE: &str = "wms_admin";

/// Who the database says the session is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRole {
    /// The role name (`current_user`).
    pub name: String,
    /// True when row-level security does not confine the role: a member of [`ADMIN_ROLE`], a
    /// superuser, a role with `BYPASSRLS`, or the owner of the tables.
    pub administrator: bool,
}

/// What `grant_operator` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OperatorGrant {
    /// The role did not exist and was created (with `LOGIN` and no password).
    pub created: bool,
    /// The role was not yet a member of [`OPERATOR_ROLE`].
    pub granted: bool,
}

/// `name` quoted as an SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

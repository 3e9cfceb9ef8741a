//! `db grant-operator NAME`: make a PostgreSQL role an operator, confined by the database to
//! its own keys (see docs/operators.md).

use anyhow::Result;
use idem_core::Operator;
use serde_json::json;

use crate::commands::Context;
use crate::exit::OK;

pub async fn run(ctx: &Context, name: &str) -> Result<u8> {
    let role = Operator::parse(name)?;
    // A schema without the isolation migration has no operator group to grant.
    let store = ctx.store().await?;
    let grant = store.grant_operator(&role).await;
    store.close().await;
    let grant = grant?;

    if grant.created {
        ctx.ui.note(format!(
            "created login role {role} without a password; set one with ALTER ROLE, or let \
             pg_hba.conf authenticate it another way"
        ));
    }
    ctx.ui.note(if grant.granted {
        format!("{role} is now an operator: it posts and sees only its own keys")
    } else {
        format!("{role} was already an operator")
    });
    if ctx.ui.is_json() {
        let value =
            json!({ "role": role.as_str(), "created": grant.created, "granted": grant.granted });
        ctx.ui.record(&value, &[])?;
    }
    Ok(OK)
}

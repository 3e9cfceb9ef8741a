//! `receive`, `ship`, `transfer` and `adjust`: build the request, validate everything before the
//! database is touched, post it, and report applied or replayed.

use anyhow::Result;
use chrono::TimeDelta;
use idem_core::{IdemKey, Kind, OnDuplicate, Outcome, Posted, Posting, Request};
use serde::Serialize;

use super::Context;
use crate::cli::{AdjustArgs, KeyArgs, OnDuplicateArg, PostArgs, TransferArgs};
use crate::exit::OK;
use crate::output::{self, opt, time};

pub async fn receive_or_ship(ctx: &Context, kind: Kind, args: PostArgs) -> Result<u8> {
    let request = Request::new(kind, &args.sku, args.qty, &args.location, None, None, None)?;
    post(ctx, request, &args.key).await
}

pub async fn transfer(ctx: &Context, args: TransferArgs) -> Result<u8> {
    let request = Request::transfer(&args.sku, args.qty, &args.from, &args.to)?;
    post(ctx, request, &args.key).await
}

pub async fn adjust(ctx: &Context, args: AdjustArgs) -> Result<u8> {
    let request = Request::adjust(&args.sku, args.delta, &args.location, &args.reason)?;
    post(ctx, request, &args.key).await
}

/// What a posting prints in JSON: a stable contract, fields only ever added.
#[derive(Debug, Serialize)]
struct PostingOutput<'a> {
    outcome: Outcome,
    key: &'a str,
    user: &'a str,
    transaction: &'a idem_core::Transaction,
    expires_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reused_expired_key: Option<uuid::Uuid>,
    generated_key: bool,
}

async fn post(ctx: &Context, request: Request, args: &KeyArgs) -> Result<u8> {
    let generated = args.key == "auto";
    let key = if generated { IdemKey::generate() } else { IdemKey::parse(&args.key)? };
    let request = match &args.reference {
        Some(reference) => request.with_reference(reference)?,
        None => request,
    };
    let ttl = TimeDelta::from_std(args.ttl).map_err(|_| idem_core::Error::InvalidInput {
        field: "ttl",
        rule: "is too long".to_owned(),
    })?;
    let on_duplicate = match args.on_duplicate {
        OnDuplicateArg::Replay => OnDuplicate::Replay,
        OnDuplicateArg::Fail => OnDuplicate::Fail,
    };
    let mut posting =
        Posting::new(ctx.operator()?, key, request).ttl(ttl)?.on_duplicate(on_duplicate);
    if generated {
        ctx.ui.note(format!("generated key: {} (retry with --key {0})", posting.key));
    }

    let store = ctx.store().await?;
    posting.user = ctx.acting_operator(&store).await?;
    let posted = store.post(&posting).await;
    store.close().await;
    let posted = posted?;

    report(ctx, &posting, &posted, generated)?;
    Ok(OK)
}

fn report(ctx: &Context, posting: &Posting, posted: &Posted, generated: bool) -> Result<()> {
    let t = &posted.transaction;
    match posted.outcome {
        Outcome::Replayed => ctx.ui.note(format!(
            "replayed: key {} was already applied as transaction {} at {}; stock unchanged",
            posting.key,
            t.id,
            time(t.created_at)
        )),
        Outcome::Applied => {
            if let Some(previous) = posted.reused_expired_key {
                ctx.ui.note(format!(
                    "note: key {} had expired and was used again; it was first used by transaction {previous}",
                    posting.key
                ));
            }
        }
    }
    let value = PostingOutput {
        outcome: posted.outcome,
        key: posting.key.as_str(),
        user: posting.user.as_str(),
        transaction: t,
        expires_at: posted.expires_at,
        reused_expired_key: posted.reused_expired_key,
        generated_key: generated,
    };
    ctx.ui.record(
        &value,
        &[
            ("outcome", posted.outcome.to_string()),
            ("transaction", t.id.to_string()),
            ("kind", t.kind.to_string()),
            ("sku", t.sku.clone()),
            ("qty", t.qty.to_string()),
            ("location", t.location.clone()),
            ("to_location", opt(t.to_location.as_deref())),
            ("reference", opt(t.reference.as_deref())),
            ("reason", opt(t.reason.as_deref())),
            ("user", t.user.clone()),
            ("key", t.key.clone()),
            ("created_at", output::time(t.created_at)),
            ("expires_at", output::time(posted.expires_at)),
        ],
    )?;
    Ok(())
}

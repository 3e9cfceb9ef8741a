//! `keys stats`: live and expired keys, the oldest live key, and replays and conflicts by kind
//! and operator; `-o prometheus` writes the text format for the node-exporter textfile collector.

use std::io::Write;

use anyhow::Result;
use chrono::{DateTime, Utc};

use crate::cli::OutputFormat;
use crate::commands::Context;
use crate::exit::OK;
use crate::output::time;

pub async fn run(ctx: &Context, since: Option<DateTime<Utc>>) -> Result<u8> {
    let store = ctx.store().await?;
    let stats = store.stats(since, Utc::now()).await;
    store.close().await;
    let stats = stats?;

    match ctx.ui.format {
        OutputFormat::Prometheus => {
            let mut out = std::io::stdout().lock();
            out.write_all(idem_core::stats::to_prometheus(&stats).as_bytes())?;
            out.flush()?;
        }
        OutputFormat::Json | OutputFormat::Jsonl => ctx.ui.record(&stats, &[])?,
        OutputFormat::Table | OutputFormat::Plain => {
            // Totals first (one line when plain), then one row per kind and operator.
            let oldest = stats.oldest_live_created_at.map(time).unwrap_or_default();
            ctx.ui.record(
                &stats,
                &[
                    ("live", stats.live.to_string()),
                    ("expired", stats.expired.to_string()),
                    ("oldest_live", oldest),
                    ("replays", stats.replays.to_string()),
                    ("conflicts", stats.conflicts.to_string()),
                ],
            )?;
            let headers = ["kind", "user", "live", "replays", "conflicts"];
            ctx.ui.list(&stats.by_kind_and_user, &headers, |g| {
                vec![
                    g.kind.clone(),
                    g.user.clone(),
                    g.counts.live.to_string(),
                    g.counts.replays.to_string(),
                    g.counts.conflicts.to_string(),
                ]
            })?;
        }
    }
    Ok(OK)
}

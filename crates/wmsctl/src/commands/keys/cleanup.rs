//! `keys cleanup`: delete expired keys in short batches, for cron. Silent on success; a summary
//! with `-v` or `-o json`. A second cleanup started beside a running one exits 75, or 0 with
//! `--skip-if-running`.

use anyhow::Result;
use chrono::Utc;
use idem_core::{CleanupOptions, Error};

use crate::cli::CleanupArgs;
use crate::commands::Context;
use crate::exit::OK;

pub async fn run(ctx: &Context, args: CleanupArgs) -> Result<u8> {
    let options = CleanupOptions {
        batch_size: args.batch_size,
        max_runtime: args.max_runtime,
        dry_run: args.dry_run,
        wait_for_lock: false,
        now: Utc::now(),
        ..CleanupOptions::default()
    };
    let store = ctx.store().await?;
    let actor = ctx.acting_operator(&store).await?;
    let result = store.cleanup(&options, &actor).await;
    store.close().await;
    let report = match result {
        Err(Error::LockHeld { what }) if args.skip_if_running => {
            ctx.ui.detail(format!("skipped: {what} is already running in another process"));
            return Ok(OK);
        }
        other => other?,
    };

    if ctx.ui.is_json() {
        ctx.ui.record(&report, &[])?;
    }
    let verb = if report.dry_run { "would remove" } else { "removed" };
    ctx.ui.detail(format!(
        "{verb} {} expired key(s) in {} batch(es), {:.3}s (longest batch {:.3}s){}",
        report.removed,
        report.batches,
        report.elapsed.as_secs_f64(),
        report.longest_batch.as_secs_f64(),
        if report.stopped_early { "; stopped at --max-runtime, run again to finish" } else { "" },
    ));
    if report.dry_run && ctx.ui.verbose == 0 && !ctx.ui.is_json() {
        // A dry run exists to be read, so it reports even without -v.
        ctx.ui.note(format!("{verb} {} expired key(s)", report.removed));
    }
    Ok(OK)
}

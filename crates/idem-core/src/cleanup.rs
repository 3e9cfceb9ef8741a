//! Key cleanup: deleting keys that have expired, in batches that are each their own short
//! transaction, so that postings running beside a cleanup wait at most one batch for it.
//!
//! Expired keys already count as free (a posting reuses them), so cleanup only reclaims space;
//! it never decides an outcome. A run takes a lock first so that only one cleanup works on a
//! database at a time: on PostgreSQL the session advisory lock [`PG_CLEANUP_LOCK_KEY`], held on
//! one connection for the whole run; on SQLite an exclusive lock on the file `<database>-cleanup.lock`
//! beside the database. Both are released by the operating system or the server when the process
//! dies, so a killed cleanup never blocks the next one. Every batch is committed before the next
//! begins and deletes only keys that had expired at [`CleanupOptions::now`], so a run killed
//! half-way loses nothing and the next run carries on where it stopped.
//!
//! A batch is sized by time, not only by count: the same 10,000 keys take a few milliseconds on
//! PostgreSQL and over half a second on SQLite, whose single writer makes every posting wait for
//! the batch in flight. The first batch deletes at most [`FIRST_BATCH_SIZE`] keys; each next one
//! is sized from the rate of the one before to take [`CleanupOptions::batch_time`], never more
//! than [`CleanupOptions::batch_size`] keys and never more than twice the batch before.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

use crate::error::{Error, Result};

/// The key of the session advisory lock a PostgreSQL cleanup holds while it runs: the bytes of
/// `"wms_cln"` read as a big-endian integer. In `pg_locks` it shows as `locktype = 'advisory'`
/// with `classid = 7826803` (the high 32 bits), `objid = 1600351342` (the low 32 bits) and
/// `objsubid = 1`.
pub const PG_CLEANUP_LOCK_KEY: i64 = 0x0077_6d73_5f63_6c6e;

/// The default number of keys deleted per transaction.
pub const DEFAULT_BATCH_SIZE: u32 = 10_000;

/// The largest batch accepted: beyond it a batch is no longer a short transaction.
pub const MAX_BATCH_SIZE: u32 = 1_000_000;

/// The most keys the first batch of a run deletes, before the run knows how fast batches go.
pub const FIRST_BATCH_SIZE: u32 = 500;

/// How long a batch should take by default: what a posting beside the cleanup waits at most.
pub const DEFAULT_BATCH_TIME: Duration = Duration::from_millis(40);

/// How a cleanup runs.
#[derive(Debug, Clone)]
pub struct CleanupOptions {
    /// The most keys deleted per transaction (1 to [`MAX_BATCH_SIZE`]).
    pub batch_size: u32,
    /// How long one transaction should take; batches are made smaller than `batch_size` when a
    /// batch of that size would take longer.
    pub batch_time: Duration,
    /// Stop starting new batches once the run has taken this long. At least one batch always
    /// runs, and the batch in flight when the time is up finishes, so a run can overshoot by
    /// one batch.
    pub max_runtime: Option<Duration>,
    /// Count the keys a run would delete, delete nothing, write no audit entry and take no lock.
    pub dry_run: bool,
    /// Wait for a running cleanup to finish instead of failing with [`Error::LockHeld`].
    pub wait_for_lock: bool,
    /// Keys whose `expires_at` is at or before this instant are deleted. Fixed for the whole run,
    /// so keys expiring while it runs are left for the next one and the run always ends.
    pub now: DateTime<Utc>,
}

impl Default for CleanupOptions {
    fn default() -> Self {
        CleanupOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            batch_time: DEFAULT_BATCH_TIME,
            max_runtime: None,
            dry_run: false,
            wait_for_lock: false,
            now: Utc::now(),
        }
    }
}

impl CleanupOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(Error::invalid(
                "batch size",
                format!("must be 1 to {MAX_BATCH_SIZE}, got {}", self.batch_size),
            ));
        }
        Ok(())
    }
}

/// What a cleanup run did. Durations serialize as fractional seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    /// Keys deleted; in a dry run, the keys that a run would delete.
    pub removed: u64,
    /// Transactions that deleted at least one key (zero in a dry run).
    pub batches: u32,
    /// The longest of those transactions: the longest a posting could have waited for the run.
    #[serde(rename = "longest_batch_seconds", serialize_with = "seconds")]
    pub longest_batch: Duration,
    /// The whole run, from before the lock was taken to after the audit entry was written.
    #[serde(rename = "elapsed_seconds", serialize_with = "seconds")]
    pub elapsed: Duration,
    /// The run stopped at [`CleanupOptions::max_runtime`] with expired keys possibly left over;
    /// the next run deletes them.
    pub stopped_early: bool,
    pub dry_run: bool,
}

impl CleanupReport {
    pub(crate) fn dry_run(would_remove: u64, elapsed: Duration) -> Self {
        CleanupReport {
            removed: would_remove,
            batches: 0,
            longest_batch: Duration::ZERO,
            elapsed,
            stopped_early: false,
            dry_run: true,
        }
    }

    /// The `detail` of the run's audit entry; `failure` is set when a batch failed.
    pub(crate) fn audit_detail(&self, failure: Option<&Error>) -> String {
        let mut detail = format!(
            "removed {} expired key(s) in {} batch(es), {:.3}s (longest batch {:.3}s)",
            self.removed,
            self.batches,
            self.elapsed.as_secs_f64(),
            self.longest_batch.as_secs_f64(),
        );
        if self.stopped_early {
            detail.push_str("; stopped at the maximum runtime, expired keys may remain");
        }
        if let Some(err) = failure {
            detail.push_str(&format!("; stopped by an error: {err}"));
        }
        detail
    }
}

fn seconds<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// What one batch deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deleted {
    pub count: u64,
    /// The latest expiry among the deleted keys, from which the next batch walks the expiry
    /// index; `None` when the database gains nothing from it (see [`ExpiredKeys`]).
    pub through: Option<DateTime<Utc>>,
}

/// One database's way of deleting a batch of expired keys.
///
/// On PostgreSQL a deleted row stays in the expiry index, dead, until vacuum removes it, so a
/// batch that walked the index from its start would step over every key the batches before it
/// deleted: the run would grow with the square of its length. Each batch there starts at the
/// expiry where the one before stopped. SQLite removes entries as it deletes them, so its
/// batches start from the oldest key and report no mark.
pub(crate) trait ExpiredKeys {
    /// Deletes up to `limit` keys that expired at or before `now`, and no earlier than `from`
    /// when it is set, oldest expiry first, in one committed transaction (contention retried).
    fn delete_batch(
        &mut self,
        now: DateTime<Utc>,
        from: Option<DateTime<Utc>>,
        limit: u32,
    ) -> impl Future<Output = Result<Deleted>> + Send;

    /// Work a committed batch leaves that postings need not wait for, done before the next
    /// batch and outside the batch's time. None by default.
    fn after_batch(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// Runs batches until one comes back short (nothing older is left) or the time is up. The report
/// is returned even when a batch fails, because the batches before it are committed and the
/// run's audit entry should say so.
pub(crate) async fn delete_expired<K: ExpiredKeys>(
    keys: &mut K,
    options: &CleanupOptions,
    started: Instant,
) -> (CleanupReport, Result<()>) {
    let mut report = CleanupReport {
        removed: 0,
        batches: 0,
        longest_batch: Duration::ZERO,
        elapsed: Duration::ZERO,
        stopped_early: false,
        dry_run: false,
    };
    let mut size = options.batch_size.min(FIRST_BATCH_SIZE);
    // Inclusive, so that keys sharing the last expiry of a batch that had no room for all of
    // them are found by the next.
    let mut from = None;
    let outcome = loop {
        let batch_started = tokio::time::Instant::now();
        let removed = match keys.delete_batch(options.now, from, size).await {
            Ok(deleted) => {
                from = deleted.through.or(from);
                deleted.count
            }
            Err(err) => break Err(err),
        };
        let took = batch_started.elapsed();
        if removed > 0 {
            report.removed += removed;
            report.batches += 1;
            report.longest_batch = report.longest_batch.max(took);
        }
        tracing::debug!(removed, total = report.removed, ?took, "cleanup batch committed");
        if let Err(err) = keys.after_batch().await {
            break Err(err);
        }
        if removed < u64::from(size) {
            break Ok(());
        }
        if let Some(limit) = options.max_runtime
            && started.elapsed() >= limit
        {
            tracing::debug!(?limit, removed = report.removed, "cleanup stopped at max runtime");
            report.stopped_early = true;
            break Ok(());
        }
        size = next_batch_size(size, took, options);
    };
    report.elapsed = started.elapsed();
    (report, outcome)
}

/// The size of the batch after one of `size` keys that took `took`: as many keys as fit in the
/// batch time at that rate, at most twice as many as before, 1 to the configured batch size.
fn next_batch_size(size: u32, took: Duration, options: &CleanupOptions) -> u32 {
    let fitting = if took.is_zero() {
        f64::INFINITY
    } else {
        f64::from(size) * options.batch_time.as_secs_f64() / took.as_secs_f64()
    };
    let ceiling = size.saturating_mul(2).min(options.batch_size);
    // `as` saturates; a rate too fast to measure is simply the ceiling.
    (fitting as u32).clamp(1, ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of expired keys in memory, failing on request.
    #[derive(Default)]
    struct Pile {
        left: u64,
        fail_on_batch: Option<u32>,
        batches: u32,
        /// How long deleting one key takes, on tokio's (paused) clock.
        per_key: Option<Duration>,
        /// The size of every batch asked for.
        sizes: Vec<u32>,
        /// Report each batch's mark as this instant plus the keys deleted so far, in seconds.
        marks_from: Option<DateTime<Utc>>,
        /// The `from` of every batch asked for.
        froms: Vec<Option<DateTime<Utc>>>,
        deleted: u64,
    }

    impl ExpiredKeys for Pile {
        async fn delete_batch(
            &mut self,
            _now: DateTime<Utc>,
            from: Option<DateTime<Utc>>,
            limit: u32,
        ) -> Result<Deleted> {
            self.sizes.push(limit);
            self.froms.push(from);
            if let Some(per_key) = self.per_key {
                tokio::time::sleep(per_key * limit).await;
            }
            self.batches += 1;
            if self.fail_on_batch == Some(self.batches) {
                return Err(Error::Busy { waited: Duration::from_secs(1), source: None });
            }
            let count = self.left.min(u64::from(limit));
            self.left -= count;
            self.deleted += count;
            let through = self
                .marks_from
                .filter(|_| count > 0)
                .map(|t| t + chrono::TimeDelta::seconds(self.deleted as i64));
            Ok(Deleted { count, through })
        }
    }

    fn options(batch_size: u32, max_runtime: Option<Duration>) -> CleanupOptions {
        CleanupOptions { batch_size, max_runtime, ..CleanupOptions::default() }
    }

    #[tokio::test]
    async fn stops_at_the_first_short_batch() {
        let mut pile = Pile { left: 25, ..Pile::default() };
        let (report, outcome) = delete_expired(&mut pile, &options(10, None), Instant::now()).await;
        outcome.unwrap();
        assert_eq!((report.removed, report.batches, pile.batches), (25, 3, 3));
        assert!(!report.stopped_early);
    }

    // Each batch starts where the last one that deleted anything stopped; the first, and every
    // batch of a store that reports no mark, from the oldest key.
    #[tokio::test]
    async fn each_batch_starts_at_the_mark_of_the_last() {
        let t = DateTime::<Utc>::UNIX_EPOCH;
        let at = |s| Some(t + chrono::TimeDelta::seconds(s));
        let mut pile = Pile { left: 20, marks_from: Some(t), ..Pile::default() };
        let (report, outcome) = delete_expired(&mut pile, &options(10, None), Instant::now()).await;
        outcome.unwrap();
        assert_eq!(report.removed, 20);
        assert_eq!(pile.froms, [None, at(10), at(20)], "an empty batch keeps the mark");

        let mut pile = Pile { left: 20, ..Pile::default() };
        delete_expired(&mut pile, &options(10, None), Instant::now()).await.1.unwrap();
        assert_eq!(pile.froms, [None, None, None]);
    }

    #[tokio::test]
    async fn an_exact_multiple_needs_one_empty_batch_that_is_not_counted() {
        let mut pile = Pile { left: 20, ..Pile::default() };
        let (report, outcome) = delete_expired(&mut pile, &options(10, None), Instant::now()).await;
        outcome.unwrap();
        assert_eq!((report.removed, report.batches, pile.batches), (20, 2, 3));
    }

    #[tokio::test]
    async fn a_spent_runtime_still_runs_one_batch() {
        let mut pile = Pile { left: 25, ..Pile::default() };
        let (report, outcome) =
            delete_expired(&mut pile, &options(10, Some(Duration::ZERO)), Instant::now()).await;
        outcome.unwrap();
        assert_eq!((report.removed, report.batches), (10, 1));
        assert!(report.stopped_early);
    }

    #[tokio::test]
    async fn a_failed_batch_keeps_the_count_of_the_committed_ones() {
        let mut pile = Pile { left: 25, fail_on_batch: Some(2), ..Pile::default() };
        let (report, outcome) = delete_expired(&mut pile, &options(10, None), Instant::now()).await;
        assert!(matches!(outcome, Err(Error::Busy { .. })));
        assert_eq!((report.removed, report.batches), (10, 1));
        let detail = report.audit_detail(outcome.as_ref().err());
        assert!(detail.starts_with("removed 10 expired key(s) in 1 batch(es)"), "{detail}");
        assert!(detail.contains("stopped by an error: database is busy"), "{detail}");
    }

    // Slow batches shrink to the batch time, fast ones grow to the batch size, doubling at most.
    #[tokio::test(start_paused = true)]
    async fn batches_are_sized_to_take_the_batch_time() {
        let slow = Some(Duration::from_micros(100));
        let mut pile = Pile { left: 10_000, per_key: slow, ..Pile::default() };
        let (report, outcome) =
            delete_expired(&mut pile, &options(10_000, None), Instant::now()).await;
        outcome.unwrap();
        assert_eq!(report.removed, 10_000);
        // 500 keys take 50 ms; 40 ms fits 400 of them.
        assert_eq!(&pile.sizes[..3], [500, 400, 400]);
        assert_eq!(report.longest_batch, Duration::from_millis(50));

        let fast = Some(Duration::from_nanos(100));
        let mut pile = Pile { left: 100_000, per_key: fast, ..Pile::default() };
        let (_, outcome) = delete_expired(&mut pile, &options(10_000, None), Instant::now()).await;
        outcome.unwrap();
        assert_eq!(&pile.sizes[..6], [500, 1_000, 2_000, 4_000, 8_000, 10_000]);
    }

    #[test]
    fn next_batch_size_stays_within_its_bounds() {
        let opts = options(5_000, None);
        let size = |size, took_ms| next_batch_size(size, Duration::from_millis(took_ms), &opts);
        assert_eq!(size(1_000, 0), 2_000, "too fast to measure: double");
        assert_eq!(size(4_000, 1), 5_000, "never past the batch size");
        assert_eq!(size(10, 100_000), 1, "never below one key");
        assert_eq!(size(1_000, 80), 500);
    }

    #[test]
    fn batch_size_bounds() {
        assert!(options(0, None).validate().is_err());
        assert!(options(1, None).validate().is_ok());
        assert!(options(MAX_BATCH_SIZE, None).validate().is_ok());
        let err = options(MAX_BATCH_SIZE + 1, None).validate().unwrap_err();
        assert!(err.to_string().starts_with("invalid batch size: "), "{err}");
    }

    #[test]
    fn lock_key_matches_its_documentation() {
        assert_eq!(&PG_CLEANUP_LOCK_KEY.to_be_bytes()[1..], b"wms_cln");
        assert_eq!(PG_CLEANUP_LOCK_KEY >> 32, 7_826_803);
        assert_eq!(PG_CLEANUP_LOCK_KEY & 0xffff_ffff, 1_600_351_342);
    }

    #[test]
    fn report_serializes_durations_as_seconds() {
        let report = CleanupReport {
            removed: 3,
            batches: 1,
            longest_batch: Duration::from_millis(250),
            elapsed: Duration::from_millis(1500),
            stopped_early: false,
            dry_run: false,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["longest_batch_seconds"], 0.25);
        assert_eq!(json["elapsed_seconds"], 1.5);
        assert_eq!(json["removed"], 3);
    }
}

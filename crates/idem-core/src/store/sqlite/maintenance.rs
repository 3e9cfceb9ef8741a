//! Cleanup and statistics on SQLite. A cleanup holds an exclusive lock on `<database>-cleanup.lock`
//! for its whole run and deletes each batch in its own `BEGIN IMMEDIATE` transaction, choosing
//! the batch through the index `idem_keys_expires_at` so that no batch scans the table.

use std::time::Instant;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Row, Sqlite, SqliteConnection};

use super::{SqliteStore, SqliteWrite, from_micros, lock_beside, to_micros};
use crate::audit::{AuditAction, NewAudit};
use crate::cleanup::{self, CleanupOptions, CleanupReport, Deleted, ExpiredKeys};
use crate::error::{Error, Result};
use crate::key::Operator;
use crate::posting::WriteTx;
use crate::retry::Retry;
use crate::stats::{DuplicateGroup, KeyStats, LiveGroup, UNKNOWN_KIND, count};

/// One batch, oldest expiry first. The table has no rowid, so the batch is named by its primary
/// key; the subquery walks `idem_keys_expires_at` and stops after `?2` rows.
const DELETE_BATCH_SQL: &str = "\
DELETE FROM idem_keys WHERE (user_name, idem_key) IN (
    SELECT user_name, idem_key FROM idem_keys WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2
)";

/// The most keys a SQLite batch deletes. Keys stored in random order cost about one changed
/// page each, and a commit that leaves more than 1,000 pages in the write-ahead log makes the
/// next commit copy them into the database file (SQLite's automatic checkpoint): the next commit
/// is a posting's, waiting beside the cleanup, before the run's own checkpoint can start. Below
/// the mark, the run's checkpoint after each batch does that work instead.
const BATCH_CEILING: u32 = 800;

/// The cleanup connection's settings for the run, and what it is handed back to the pool with:
/// the settings every connection opens with (SQLite's default checkpoint threshold).
const CLEANUP_SETTINGS: &str = "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0";
const POOL_SETTINGS: &str = "PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 1000";

const COUNT_EXPIRED_SQL: &str = "SELECT COUNT(*) FROM idem_keys WHERE expires_at <= ?1";

const LIVE_GROUPS_SQL: &str = "\
SELECT kind, user_name, COUNT(*), MIN(created_at) FROM idem_keys
WHERE expires_at > ?1
GROUP BY kind, user_name";

/// Replays and conflicts by the kind of the transaction each entry names (see [`KeyStats`]).
/// The lower bound is always bound, so the range on `audit_log_action_at` is always used.
const DUPLICATE_GROUPS_SQL: &str = "\
SELECT COALESCE(l.kind, ?2), a.actor,
       SUM(a.action = 'replayed'), SUM(a.action = 'conflict')
FROM audit_log a LEFT JOIN ledger l ON l.id = a.transaction_id
WHERE a.action IN ('replayed', 'conflict') AND a.at >= ?1
GROUP BY 1, 2";

/// Deletes batches on one connection held for the whole run, one short transaction each.
struct SqliteExpired<'s> {
    store: &'s SqliteStore,
    conn: PoolConnection<Sqlite>,
}

impl ExpiredKeys for SqliteExpired<'_> {
    /// A batch of random keys changes about one page per key, and its commit would copy them
    /// from the write-ahead log into the database file (an automatic checkpoint, once the log
    /// passes 1,000 pages) before returning. The copy needs no lock that postings take, yet it
    /// counted in the batch's time: batches of 1,400 keys took 75 ms against 14 ms for 700, and
    /// the run sized its batches down to fit. Here it runs between batches, while postings go on.
    async fn after_batch(&mut self) -> Result<()> {
        sqlx::raw_sql("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut *self.conn)
            .await
            .map_err(self.store.map("copying cleaned pages into the database"))?;
        Ok(())
    }

    /// Every batch starts from the oldest key: SQLite takes a deleted key's entry out of the
    /// index at once, so nothing is stepped over.
    async fn delete_batch(
        &mut self,
        now: DateTime<Utc>,
        _from: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Deleted> {
        let mut retry = Retry::new(self.store.busy_budget);
        loop {
            match self.store.delete_batch_once(&mut self.conn, now, limit).await {
                Err(err) => retry.pause(err).await?,
                Ok(count) => return Ok(Deleted { count, through: None }),
            }
        }
    }
}

impl SqliteStore {
    // Errors at debug: reporting them is the caller's job, and a held lock is routine for a
    // cron job that skips when another run is busy.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub(crate) async fn cleanup(
        &self,
        options: &CleanupOptions,
        actor: &Operator,
    ) -> Result<CleanupReport> {
        options.validate()?;
        let started = Instant::now();
        if options.dry_run {
            let would_remove: i64 = sqlx::query_scalar(COUNT_EXPIRED_SQL)
                .bind(to_micros(options.now))
                .fetch_one(&self.pool)
                .await
                .map_err(self.map("counting expired keys"))?;
            tracing::debug!(would_remove, "cleanup dry run");
            return Ok(CleanupReport::dry_run(count(would_remove), started.elapsed()));
        }

        // The lock is a file lock, released by the kernel when this process ends however it
        // ends; waiting for it blocks, so it happens off the async threads.
        let path = self.path.clone();
        let wait = options.wait_for_lock;
        let lock = tokio::task::spawn_blocking(move || lock_beside(&path, "-cleanup.lock", wait))
            .await
            .map_err(|e| Error::Database {
                during: "taking the cleanup lock",
                source: Box::new(e),
            })??;
        let Some(_lock) = lock else {
            tracing::debug!("another cleanup holds the lock");
            return Err(Error::LockHeld { what: "key cleanup" });
        };

        // A batch only deletes keys that had already expired, and an expired key already
        // counts as free: if a power loss takes the last batches back, the next run deletes
        // those keys again and nothing else changes. The run's connection therefore commits
        // without the fsync that a posting's commit does (`synchronous = NORMAL`, still
        // crash-safe in WAL mode); the next posting's commit, or the next checkpoint, makes its
        // batches durable. Its checkpoints run between batches rather than inside their commits
        // (see `after_batch`). It goes back to the pool as the others are, or is closed.
        let mut conn = self.pool.acquire().await.map_err(self.map("connecting"))?;
        sqlx::raw_sql(CLEANUP_SETTINGS)
            .execute(&mut *conn)
            .await
            .map_err(self.map("beginning a cleanup"))?;
        let mut expired = SqliteExpired { store: self, conn };
        let options =
            CleanupOptions { batch_size: options.batch_size.min(BATCH_CEILING), ..options.clone() };
        let (mut report, outcome) = cleanup::delete_expired(&mut expired, &options, started).await;
        let mut conn = expired.conn;
        if sqlx::raw_sql(POOL_SETTINGS).execute(&mut *conn).await.is_err() {
            conn.close_on_drop();
        }
        drop(conn);
        let detail = report.audit_detail(outcome.as_ref().err());
        let audited = self.audit_cleanup(options.now, actor, &detail).await;
        match outcome {
            Err(err) => {
                if let Err(audit_err) = audited {
                    tracing::warn!(error = %audit_err, "could not record the failed cleanup run");
                }
                Err(err)
            }
            Ok(()) => {
                audited?;
                report.elapsed = started.elapsed();
                Ok(report)
            }
        }
    }

    async fn delete_batch_once(
        &self,
        conn: &mut SqliteConnection,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64> {
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.map("beginning a cleanup batch"))?;
        let done = sqlx::query(DELETE_BATCH_SQL)
            .bind(to_micros(now))
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await
            .map_err(self.map("deleting expired keys"))?;
        tx.commit().await.map_err(self.map("committing a cleanup batch"))?;
        Ok(done.rows_affected())
    }

    async fn audit_cleanup(&self, at: DateTime<Utc>, actor: &Operator, detail: &str) -> Result<()> {
        let entry = NewAudit {
            at,
            action: AuditAction::Cleanup,
            actor: actor.as_str(),
            key: None,
            transaction_id: None,
            detail,
        };
        let mut retry = Retry::new(self.busy_budget);
        loop {
            let attempt = async {
                let mut conn = self.pool.acquire().await.map_err(self.map("connecting"))?;
                let mut tx = conn
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(self.map("beginning the cleanup audit entry"))?;
                SqliteWrite(&mut tx).insert_audit(&entry).await?;
                tx.commit().await.map_err(self.map("committing the cleanup audit entry"))
            };
            match attempt.await {
                Err(err) => retry.pause(err).await?,
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Reads everything in one read transaction, so that the numbers come from one snapshot.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub(crate) async fn stats(
        &self,
        since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<KeyStats> {
        let map = self.map("reading key statistics");
        let mut conn = self.pool.acquire().await.map_err(self.map("connecting"))?;
        let mut tx = conn.begin().await.map_err(&map)?;
        let expired: i64 = sqlx::query_scalar(COUNT_EXPIRED_SQL)
            .bind(to_micros(now))
            .fetch_one(&mut *tx)
            .await
            .map_err(&map)?;
        let live = sqlx::query(LIVE_GROUPS_SQL)
            .bind(to_micros(now))
            .fetch_all(&mut *tx)
            .await
            .map_err(&map)?
            .iter()
            .map(|r| {
                Ok(LiveGroup {
                    kind: r.try_get(0)?,
                    user: r.try_get(1)?,
                    live: count(r.try_get(2)?),
                    oldest_created_at: from_micros(r.try_get(3)?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(&map)?;
        let duplicates = sqlx::query(DUPLICATE_GROUPS_SQL)
            .bind(since.map_or(i64::MIN, to_micros))
            .bind(UNKNOWN_KIND)
            .fetch_all(&mut *tx)
            .await
            .map_err(&map)?
            .iter()
            .map(|r| {
                Ok(DuplicateGroup {
                    kind: r.try_get(0)?,
                    user: r.try_get(1)?,
                    replays: count(r.try_get(2)?),
                    conflicts: count(r.try_get(3)?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(&map)?;
        tx.rollback().await.map_err(&map)?;

        tracing::debug!(expired, groups = live.len(), "key statistics read");
        Ok(KeyStats::assemble(now, since, count(expired), live, duplicates))
    }
}

#[cfg(test)]
mod tests {
    use sqlx::SqliteConnection;

    use super::*;
    use crate::store::sqlite::MIGRATOR;

    /// The `detail` column of `EXPLAIN QUERY PLAN`, one line per step.
    async fn plan(conn: &mut SqliteConnection, sql: &str, binds: usize) -> Vec<String> {
        let explain = format!("EXPLAIN QUERY PLAN {sql}");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(explain));
        for _ in 0..binds {
            query = query.bind(0_i64);
        }
        let rows = query.fetch_all(&mut *conn).await.unwrap();
        rows.iter().map(|r| r.get::<String, _>(3)).collect()
    }

    /// A batch must walk the expiry index and delete by primary key; a full scan of the key
    /// table in every batch is what batching exists to avoid.
    #[tokio::test]
    async fn queries_use_the_indexes() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        MIGRATOR.run(&mut conn).await.unwrap();

        let batch = plan(&mut conn, DELETE_BATCH_SQL, 2).await;
        assert!(
            batch.iter().any(|s| s.contains("USING COVERING INDEX idem_keys_expires_at")),
            "{batch:?}"
        );
        assert!(batch.iter().any(|s| s.contains("USING PRIMARY KEY")), "{batch:?}");
        assert!(!batch.iter().any(|s| s.starts_with("SCAN")), "{batch:?}");

        let count = plan(&mut conn, COUNT_EXPIRED_SQL, 1).await;
        assert_eq!(
            count,
            ["SEARCH idem_keys USING COVERING INDEX idem_keys_expires_at (expires_at<?)"]
        );

        let duplicates = plan(&mut conn, DUPLICATE_GROUPS_SQL, 2).await;
        assert!(
            duplicates
                .iter()
                .any(|s| s.contains("USING INDEX audit_log_action_at (action=? AND at>?)")),
            "{duplicates:?}"
        );
    }
}

//! Cleanup and statistics on PostgreSQL. A cleanup takes the session advisory lock
//! [`PG_CLEANUP_LOCK_KEY`] on one connection and runs every batch and its audit entry on that
//! same connection, so that the lock and the work share its fate: if the connection drops, the
//! server releases the lock and no batch can run without it.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Postgres, Row};

use super::{PgStore, PgWrite, map_err};
use crate::audit::{AuditAction, NewAudit};
use crate::cleanup::{
    self, CleanupOptions, CleanupReport, Deleted, ExpiredKeys, PG_CLEANUP_LOCK_KEY,
};
use crate::error::{Error, Result};
use crate::key::Operator;
use crate::posting::WriteTx;
use crate::retry::Retry;
use crate::stats::{DuplicateGroup, KeyStats, LiveGroup, UNKNOWN_KIND, count};

/// One batch, oldest expiry first, named by `ctid` so that the delete is a TID scan of exactly
/// the rows the subquery found on `idem_keys_expires_at`. `= ANY(ARRAY(...))` runs the subquery
/// once as an init plan; `IN (SELECT ... LIMIT n)` may instead be planned as a join that scans
/// the whole table. The walk of the index starts at `$3`, the last expiry the batch before
/// deleted (see [`crate::cleanup::ExpiredKeys`]): from the start of the index, a run of 1,000,000
/// keys in batches of 2,000 took 4.4 s instead of 2.5 s. The outer `expires_at` check keeps a
/// key that was renewed after the subquery read it. Returns the count deleted and the latest
/// expiry among them.
///
/// The batch does not lock its rows before deleting them: locking them first (`FOR UPDATE`)
/// writes every row twice, and a PL/pgSQL loop over 1,000,000 expired keys in batches of 10,000
/// took 1.84 s with the lock and 1.38 s without. A key that a posting is reusing right now is
/// locked by that posting, and the delete would wait for it; it waits at most
/// 10 ms ([`BEGIN_WAITING_BRIEFLY`]), and the batch then runs again as
/// [`DELETE_BATCH_SKIPPING_LOCKED_SQL`].
const DELETE_BATCH_SQL: &str = delete_batch!("");

/// [`DELETE_BATCH_SQL`] for a batch that found a row locked: it locks its rows first, skipping
/// those that a posting holds, which are left to the next run.
const DELETE_BATCH_SKIPPING_LOCKED_SQL: &str = delete_batch!("FOR UPDATE SKIP LOCKED");

/// The batch statement, with what its subquery says about the rows it picks.
macro_rules! delete_batch {
    ($locking:literal) => {
        concat!(
            "WITH gone AS (
    DELETE FROM idem_keys
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM idem_keys
        WHERE expires_at >= COALESCE($3, '-infinity'::timestamptz) AND expires_at <= $1
        ORDER BY expires_at LIMIT $2 ",
            $locking,
            "
    ))
    AND expires_at <= $1
    RETURNING expires_at
)
SELECT COUNT(*), MAX(expires_at) FROM gone"
        )
    };
}
use delete_batch;

/// How a batch that does not lock its rows first begins: it waits at most 10 ms for a row that
/// a posting holds (a posting holds a key for a few milliseconds), and then runs again skipping
/// such rows. The same limit ends a deadlock with an import's chunk at once.
const BEGIN_WAITING_BRIEFLY: &str = "BEGIN; SET LOCAL lock_timeout = '10ms'";

const COUNT_EXPIRED_SQL: &str = "SELECT COUNT(*) FROM idem_keys WHERE expires_at <= $1";

const LIVE_GROUPS_SQL: &str = "\
SELECT kind, user_name, COUNT(*), MIN(created_at) FROM idem_keys
WHERE expires_at > $1
GROUP BY kind, user_name";

/// Replays and conflicts by the kind of the transaction each entry names (see [`KeyStats`]).
/// With no window the bound is `-infinity`, so the range on `audit_log_action_at` still applies.
const DUPLICATE_GROUPS_SQL: &str = "\
SELECT COALESCE(l.kind, $2), a.actor,
       COUNT(*) FILTER (WHERE a.action = 'replayed'),
       COUNT(*) FILTER (WHERE a.action = 'conflict')
FROM audit_log a LEFT JOIN ledger l ON l.id = a.transaction_id
WHERE a.action IN ('replayed', 'conflict') AND a.at >= COALESCE($1, '-infinity'::timestamptz)
GROUP BY 1, 2";

/// Deletes batches on the connection that holds the cleanup lock.
struct PgExpired<'c> {
    conn: &'c mut PoolConnection<Postgres>,
    busy_budget: Duration,
}

impl ExpiredKeys for PgExpired<'_> {
    async fn delete_batch(
        &mut self,
        now: DateTime<Utc>,
        from: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Deleted> {
        let mut retry = Retry::new(self.busy_budget);
        let mut skip_locked = false;
        loop {
            match delete_batch_once(self.conn, now, from, limit, skip_locked).await {
                Err(err) => retry.pause(err).await?,
                Ok(None) => {
                    tracing::debug!("a key of the batch is held by a posting; skipping such keys");
                    skip_locked = true;
                }
                Ok(Some(done)) => return Ok(done),
            }
        }
    }
}

/// One attempt at a batch; `None` when it gave up waiting for a row that a posting holds.
async fn delete_batch_once(
    conn: &mut PoolConnection<Postgres>,
    now: DateTime<Utc>,
    from: Option<DateTime<Utc>>,
    limit: u32,
    skip_locked: bool,
) -> Result<Option<Deleted>> {
    let (begin, statement) = if skip_locked {
        ("BEGIN", DELETE_BATCH_SKIPPING_LOCKED_SQL)
    } else {
        (BEGIN_WAITING_BRIEFLY, DELETE_BATCH_SQL)
    };
    let mut tx = conn.begin_with(begin).await.map_err(map_err("beginning a cleanup batch"))?;
    let deleted = sqlx::query_as(statement)
        .bind(now)
        .bind(i64::from(limit))
        .bind(from)
        .fetch_one(&mut *tx)
        .await;
    let (count, through): (i64, Option<DateTime<Utc>>) = match deleted {
        Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            tx.rollback().await.map_err(map_err("rolling back a cleanup batch"))?;
            return Ok(None);
        }
        other => other.map_err(map_err("deleting expired keys"))?,
    };
    tx.commit().await.map_err(map_err("committing a cleanup batch"))?;
    Ok(Some(Deleted { count: count as u64, through }))
}

/// The error a statement ends with when `lock_timeout` runs out.
const LOCK_NOT_AVAILABLE: &str = "55P03";

impl PgStore {
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
                .bind(options.now)
                .fetch_one(&self.pool)
                .await
                .map_err(map_err("counting expired keys"))?;
            tracing::debug!(would_remove, "cleanup dry run");
            return Ok(CleanupReport::dry_run(count(would_remove), started.elapsed()));
        }

        // The connection never goes back to the pool: however this function ends, it is closed,
        // and closing the session releases the lock.
        let mut conn = self.pool.acquire().await.map_err(map_err("connecting"))?;
        conn.close_on_drop();
        if options.wait_for_lock {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(PG_CLEANUP_LOCK_KEY)
                .execute(&mut *conn)
                .await
                .map_err(map_err("waiting for the cleanup lock"))?;
        } else {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(PG_CLEANUP_LOCK_KEY)
                .fetch_one(&mut *conn)
                .await
                .map_err(map_err("taking the cleanup lock"))?;
            if !locked {
                tracing::debug!("another cleanup holds the advisory lock");
                return Err(Error::LockHeld { what: "key cleanup" });
            }
        }

        let mut expired = PgExpired { conn: &mut conn, busy_budget: self.busy_budget };
        let (mut report, outcome) = cleanup::delete_expired(&mut expired, options, started).await;
        let detail = report.audit_detail(outcome.as_ref().err());
        let audited = self.audit_cleanup(&mut conn, options.now, actor, &detail).await;
        release(conn).await;
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

    async fn audit_cleanup(
        &self,
        conn: &mut PoolConnection<Postgres>,
        at: DateTime<Utc>,
        actor: &Operator,
        detail: &str,
    ) -> Result<()> {
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
            match PgWrite(conn).insert_audit(&entry).await {
                Err(err) => retry.pause(err).await?,
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Reads everything in one read-only REPEATABLE READ transaction, so that the numbers come
    /// from one snapshot.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub(crate) async fn stats(
        &self,
        since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<KeyStats> {
        let map = map_err("reading key statistics");
        let mut conn = self.pool.acquire().await.map_err(map_err("connecting"))?;
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(&map)?;
        let expired: i64 = sqlx::query_scalar(COUNT_EXPIRED_SQL)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(&map)?;
        let live = sqlx::query(LIVE_GROUPS_SQL)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(&map)?
            .iter()
            .map(|r| {
                Ok(LiveGroup {
                    kind: r.try_get(0)?,
                    user: r.try_get(1)?,
                    live: count(r.try_get(2)?),
                    oldest_created_at: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(&map)?;
        let duplicates = sqlx::query(DUPLICATE_GROUPS_SQL)
            .bind(since)
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

/// Gives the lock back and closes the connection. Closing the session releases the lock too, but
/// a close that fails half-way leaves the server holding it until it notices the dead socket;
/// unlocking first does not depend on that. A failure of either is no error of the run.
async fn release(mut conn: PoolConnection<Postgres>) {
    let unlocked: Result<bool, sqlx::Error> = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(PG_CLEANUP_LOCK_KEY)
        .fetch_one(&mut *conn)
        .await;
    if let Err(err) = unlocked {
        tracing::debug!(error = %err, "releasing the cleanup lock failed; closing the session");
    }
    if let Err(err) = conn.close().await {
        tracing::debug!(error = %err, "closing the cleanup connection failed");
    }
}

#[cfg(all(test, feature = "test-support"))]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::testing::TestDb;
    use chrono::TimeDelta;

    /// A batch must walk the expiry index and delete by tuple id, with a plan made for the
    /// values at hand and with the generic plan a prepared statement settles on after a few
    /// runs; a scan of the whole key table in every batch is what batching exists to avoid.
    /// Only the batch that skips the rows postings hold locks its rows first.
    #[tokio::test]
    async fn batch_walks_the_expiry_index_and_deletes_by_tuple_id() {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        let Store::Postgres(store) = db.store() else {
            unreachable!("TestDb::postgres opens PostgreSQL");
        };
        let mut conn = store.pool.acquire().await.unwrap();
        // Twenty thousand keys, a quarter of them expired, with statistics: the shape the
        // planner sees in production rather than the empty table it would guess about.
        let now = DateTime::from_timestamp(2_000_000_000, 0).unwrap();
        sqlx::query(
            "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, created_at, expires_at) \
             SELECT 'u' || (i % 7), 'k' || i, 'receive', 'f', 'c', $1 - interval '2 days', \
                    $1 - interval '1 day' + i * interval '6 seconds' \
             FROM generate_series(1, 20000) i",
        )
        .bind(now)
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query("ANALYZE idem_keys").execute(&mut *conn).await.unwrap();
        for (name, statement, locks) in [
            ("plain", DELETE_BATCH_SQL, false),
            ("skipping", DELETE_BATCH_SKIPPING_LOCKED_SQL, true),
        ] {
            let prepare =
                format!("PREPARE {name}(timestamptz, bigint, timestamptz) AS {statement}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(prepare)).execute(&mut *conn).await.unwrap();
            for mode in ["force_custom_plan", "force_generic_plan"] {
                let set = format!("SET plan_cache_mode = {mode}");
                sqlx::raw_sql(sqlx::AssertSqlSafe(set)).execute(&mut *conn).await.unwrap();
                // From a mark half-way through the expired keys, as every batch after the first.
                let from = now - TimeDelta::hours(12);
                let explain = format!(
                    "EXPLAIN EXECUTE {name}('{}', 1000, '{}')",
                    now.to_rfc3339(),
                    from.to_rfc3339()
                );
                let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap();
                let plan = plan.join("\n");
                let what = format!("{name}, {mode}:\n{plan}");
                assert!(plan.contains("Index Scan using idem_keys_expires_at"), "{what}");
                assert!(plan.contains("Tid Scan on idem_keys"), "{what}");
                assert_eq!(plan.contains("LockRows"), locks, "{what}");
                assert!(plan.contains("Index Cond: ((expires_at >= "), "{what}");
                assert!(!plan.contains("Seq Scan"), "{what}");
            }
        }
    }
}

//! Key cleanup: `Store::cleanup` of a million expired keys against a hand-written batched delete
//! loop, the longest batch of each, and the p99 latency of postings running beside the cleanup
//! against the p99 of the same postings just before it started.
//!
//! Every round starts from a copy of one prepared database (the expired keys, a tenth as many
//! live ones), and both sides run with the same light stream of postings beside them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use idem_core::{CleanupOptions, Operator, Store, StoreOptions};
use sqlx::{Connection, PgConnection};

use crate::baseline::{self, Loop};
use crate::measure::{self, Samples, Side, sides};
use crate::rate::posting;
use crate::report::{Check, Figure, Unit, Value, thousands};
use crate::{Bench, Db};

/// Keys deleted per transaction by the hand-written loop.
const BATCH: i64 = 10_000;
/// Postings of the stream beside the cleanup that are not counted.
const WARM_UP: usize = 20;
/// One posting starts this often beside the cleanup (or as soon as the previous one ends).
const POSTING_EVERY: Duration = Duration::from_millis(5);

/// Fills a fresh database with `expired` keys that expired over the last day, in an order
/// unrelated to their key (as random keys are), and a tenth as many live keys.
async fn prepare(bench: &Bench, db: Db, expired: usize) -> String {
    let url = bench.fresh_database(db, &format!("cleanup_{db}_template")).await;
    let live = expired / 10;
    let now = Utc::now();
    match db {
        Db::Sqlite => {
            let mut conn = baseline::sqlite_connect(&url).await;
            for (count, expires_from, step, prefix) in [
                (expired, now - TimeDelta::days(1), 40_000, "x"),
                (live, now + TimeDelta::days(1), 1, "l"),
            ] {
                sqlx::query(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                     INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
                     SELECT 'bench', ?2 || lower(hex(randomblob(16))), 'receive', lower(hex(randomblob(32))), \
                            '{\"kind\":\"receive\",\"sku\":\"SKU-' || (i % 5000) || '\",\"qty\":1,\"location\":\"L-1\",\"to_location\":null,\"reference\":null,\"reason\":null}', \
                            lower(hex(randomblob(16))), ?3, ?4 + i * ?5 FROM n",
                )
                .bind(count as i64)
                .bind(prefix)
                .bind((expires_from - TimeDelta::days(1)).timestamp_micros())
                .bind(expires_from.timestamp_micros())
                .bind(step)
                .execute(&mut conn)
                .await
                .expect("filling the key table");
            }
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut conn).await.ok();
            conn.close().await.ok();
        }
        Db::Postgres => {
            let mut conn = PgConnection::connect(&url).await.expect("connecting");
            for (count, expires_from, step) in [
                (expired, now - TimeDelta::days(1), "40 milliseconds"),
                (live, now + TimeDelta::days(1), "1 microsecond"),
            ] {
                sqlx::query(
                    "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
                     SELECT 'bench', md5(random()::text), 'receive', md5(i::text) || md5(random()::text), \
                            '{\"kind\":\"receive\",\"sku\":\"SKU-' || (i % 5000) || '\",\"qty\":1,\"location\":\"L-1\",\"to_location\":null,\"reference\":null,\"reason\":null}', \
                            gen_random_uuid(), $1, $2 + i * $3::interval FROM generate_series(1, $4) i",
                )
                .bind(expires_from - TimeDelta::days(1))
                .bind(expires_from)
                .bind(step)
                .bind(count as i64)
                .execute(&mut conn)
                .await
                .expect("filling the key table");
            }
            // What autovacuum would have done by the time a day of keys had expired.
            sqlx::raw_sql("VACUUM ANALYZE idem_keys").execute(&mut conn).await.expect("vacuum");
            conn.close().await.ok();
        }
    }
    url
}

/// A fresh copy of the prepared database for one round.
async fn copy(bench: &Bench, db: Db, template: &str, name: &str) -> String {
    let name = name.to_lowercase();
    match db {
        Db::Sqlite => {
            let path = bench.work.path().join(format!("wms_bench_{name}.db"));
            for suffix in ["-wal", "-shm"] {
                std::fs::remove_file(format!("{}{suffix}", path.display())).ok();
            }
            std::fs::copy(baseline::sqlite_path(template), &path).expect("copying the database");
            format!("sqlite://{}", path.display())
        }
        Db::Postgres => {
            let template = template.rsplit('/').next().unwrap_or_default();
            bench.pg.copy_database(template, &format!("wms_bench_{name}")).await
        }
    }
}

/// Postings one after another beside whatever else runs, each latency stamped with its start.
struct Poster {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Instant, f64)>>,
}

impl Poster {
    async fn start(url: &str, tag: String) -> Poster {
        let options = StoreOptions { max_connections: 1, ..StoreOptions::default() };
        let store = Store::connect(url, &options).await.expect("connecting the poster");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut ticks = tokio::time::interval(POSTING_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0.. {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                ticks.tick().await;
                let started = Instant::now();
                let key = format!("{tag}-{n}");
                store.post(&posting(&key, "SKU-BESIDE", "BIN-1")).await.expect("posting");
                // The first postings prepare their statements: not what a cleanup changes.
                if n >= WARM_UP {
                    latencies.push((started, measure::millis(started.elapsed())));
                }
            }
            store.close().await;
            latencies
        });
        Poster { stop, task }
    }

    /// Stops and splits the latencies at `split`: before it, and from it on.
    async fn finish(self, split: Instant) -> (Samples, Samples) {
        self.stop.store(true, Ordering::Relaxed);
        let latencies = self.task.await.expect("the poster");
        let (before, after): (Vec<_>, Vec<_>) = latencies.iter().partition(|(at, _)| *at < split);
        (
            Samples(before.iter().map(|(_, ms)| *ms).collect()),
            Samples(after.iter().map(|(_, ms)| *ms).collect()),
        )
    }
}

/// Runs one side's cleanup; returns its wall time and its longest batch.
async fn clean(db: Db, url: &str, side: Side, expected: usize) -> (Duration, Duration) {
    let now: DateTime<Utc> = Utc::now();
    let started = Instant::now();
    let (removed, longest) = match side {
        Side::Product => {
            let store = Store::connect(url, &StoreOptions::default()).await.expect("connecting");
            let options = CleanupOptions { now, ..CleanupOptions::default() };
            let actor = Operator::parse(baseline::USER).expect("a valid operator");
            let report = store.cleanup(&options, &actor).await.expect("cleanup");
            store.close().await;
            (report.removed, report.longest_batch)
        }
        Side::Baseline => {
            let mut conn = Loop::connect(db, url).await;
            let done = baseline::delete_expired(&mut conn, now, BATCH).await;
            conn.close().await;
            done
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(removed, expected as u64, "{side:?} cleanup removed every expired key");
    (elapsed, longest)
}

pub async fn run(bench: &mut Bench) {
    let keys = bench.sizes.cleanup_keys;
    // Long enough for a few hundred postings before each cleanup starts.
    let quiet = if bench.sizes.cleanup_rounds > 1 {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(500)
    };
    for db in Db::BOTH {
        let template = prepare(bench, db, keys).await;
        let mut time = [Samples::default(), Samples::default()];
        let mut longest = [Samples::default(), Samples::default()];
        let mut p99_alone = Samples::default();
        let mut p99_during = Samples::default();
        let mut p99_during_baseline = Samples::default();
        for round in 0..bench.sizes.cleanup_rounds {
            for side in sides(round) {
                let url =
                    copy(bench, db, &template, &format!("cleanup_{db}_{round}_{side:?}")).await;
                let poster = Poster::start(&url, format!("beside-{round}-{side:?}")).await;
                tokio::time::sleep(quiet).await;
                let split = Instant::now();
                let (elapsed, batch) = clean(db, &url, side, keys).await;
                let (alone, during) = poster.finish(split).await;
                let i = usize::from(side == Side::Baseline);
                time[i].push(measure::millis(elapsed));
                longest[i].push(measure::millis(batch));
                match side {
                    Side::Product => {
                        p99_alone.push(alone.percentile(99.0));
                        p99_during.push(during.percentile(99.0));
                    }
                    Side::Baseline => p99_during_baseline.push(during.percentile(99.0)),
                }
                bench.drop_database(db, &url).await;
            }
        }
        bench.drop_database(db, &template).await;

        let batches = format!("batches of {}", thousands(BATCH as f64));
        let figure = Figure::compare(
            format!("cleanup.{db}"),
            format!("cleanup of {} expired keys", thousands(keys as f64)),
            Some(db.name()),
            Value::new("Store::cleanup", Unit::Millis, &time[0]),
            Value::new(format!("sqlx loop, {batches}"), Unit::Millis, &time[1]),
        )
        .check(|f| Check::ratio_at_most(f.ratio(), 1.2))
        .note(format!(
            "with a posting every {POSTING_EVERY:?} beside both sides; the hand-written loop deletes {batches} chosen through the expiry index"
        ));
        bench.record(figure);

        let figure = Figure::compare(
            format!("cleanup_longest_batch.{db}"),
            "cleanup: longest single batch",
            Some(db.name()),
            Value::new("Store::cleanup", Unit::Millis, &longest[0]),
            Value::new(format!("sqlx loop, {batches}"), Unit::Millis, &longest[1]),
        )
        .check(|f| Check::value_at_most(&f.product, 100.0));
        bench.record(figure);

        let figure = Figure::compare(
            format!("cleanup_p99.{db}"),
            "posting p99 latency during cleanup",
            Some(db.name()),
            Value::new("during Store::cleanup", Unit::Millis, &p99_during),
            Value::new("no cleanup", Unit::Millis, &p99_alone),
        )
        .check(|f| Check::ratio_at_most(f.ratio(), 2.0))
        .note(format!("p99 during the hand-written loop: {:.1} ms", p99_during_baseline.median()));
        bench.record(figure);
    }
}

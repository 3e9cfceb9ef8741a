//! `keys cleanup` and `keys stats` as cron and a metrics collector run them: the real binary, one
//! runner at a time, silent on success.

use std::process::{Command, Stdio};

use idem_core::testing::TestDb;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wmsctl");

fn wmsctl(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["--no-dotenv", "--database-url", db.url(), "--user", "cron"])
        .args(args)
        .env_remove("WMS_DATABASE_URL")
        .env_remove("WMS_USER")
        .stdin(Stdio::null())
        .output()
        .expect("running wmsctl");
    (
        out.status.code().expect("an exit code"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Posts `n` receipts whose keys expired an hour ago, and one that is still live.
async fn expired_keys(db: &TestDb, n: usize) {
    use idem_core::{IdemKey, Operator, Posting, Request};
    let past = chrono::Utc::now() - chrono::TimeDelta::hours(2);
    let user = Operator::parse("cron").unwrap();
    for i in 0..n {
        let posting = Posting::new(
            user.clone(),
            IdemKey::parse(&format!("old-{i}")).unwrap(),
            Request::receive("S", 1, "A").unwrap(),
        )
        .ttl(chrono::TimeDelta::hours(1))
        .unwrap();
        db.store().post_at(&posting, past).await.unwrap();
    }
    let live =
        Posting::new(user, IdemKey::parse("live").unwrap(), Request::receive("S", 1, "A").unwrap());
    db.store().post(&live).await.unwrap();
}

idem_core::both_databases!(cleanup_is_silent_and_removes_only_expired_keys, |db| {
    expired_keys(db, 25).await;
    let dry = wmsctl(db, &["keys", "cleanup", "--dry-run"]);
    assert_eq!((dry.0, dry.1.as_str()), (0, ""));
    assert_eq!(dry.2, "wmsctl: would remove 25 expired key(s)\n");

    let quiet = wmsctl(db, &["keys", "cleanup", "--batch-size", "10"]);
    assert_eq!(quiet, (0, String::new(), String::new()), "silent on success");
    let again = wmsctl(db, &["keys", "cleanup", "-o", "json"]);
    assert_eq!(again.0, 0);
    let report: Value = serde_json::from_str(&again.1).unwrap();
    assert_eq!(report["removed"], 0);

    let (code, listed, _) = wmsctl(db, &["keys", "list", "-o", "json"]);
    assert_eq!(code, 0);
    let keys: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["key"], "live");

    let (_, audit, _) = wmsctl(db, &["audit", "list", "--action", "cleanup", "-o", "json"]);
    let audit: Vec<Value> = serde_json::from_str(&audit).unwrap();
    assert_eq!(audit.len(), 2, "one entry per run, none for the dry run");
    assert!(
        audit[1]["detail"]
            .as_str()
            .unwrap()
            .starts_with("removed 25 expired key(s) in 3 batch(es)"),
        "{audit:?}"
    );
    assert_eq!(audit[1]["actor"], "cron");
});

idem_core::both_databases!(a_second_cleanup_exits_75_or_skips, |db| {
    expired_keys(db, 3).await;
    let _held = hold_cleanup_lock(db).await;
    let (code, stdout, stderr) = wmsctl(db, &["keys", "cleanup"]);
    assert_eq!((code, stdout.as_str()), (75, ""));
    assert_eq!(stderr, "wmsctl: key cleanup is already running in another process\n");
    assert_eq!(
        wmsctl(db, &["keys", "cleanup", "--skip-if-running"]),
        (0, String::new(), String::new())
    );
    let (_, listed, _) = wmsctl(db, &["keys", "list", "--expired", "-o", "json"]);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&listed).unwrap().len(),
        3,
        "nothing was removed"
    );
});

/// Holds the lock a running cleanup holds, the way another process would.
async fn hold_cleanup_lock(db: &TestDb) -> Box<dyn std::any::Any> {
    if let Some(path) = db.url().strip_prefix("sqlite://") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(format!("{path}-cleanup.lock"))
            .unwrap();
        file.lock().unwrap();
        return Box::new(file);
    }
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(idem_core::cleanup::PG_CLEANUP_LOCK_KEY)
        .execute(&mut conn)
        .await
        .unwrap();
    Box::new(conn)
}

idem_core::both_databases!(stats_report_keys_replays_and_conflicts, |db| {
    expired_keys(db, 2).await;
    let receive = ["receive", "--key", "r", "--sku", "S", "--qty", "1", "--location", "A"];
    assert_eq!(wmsctl(db, &receive).0, 0);
    assert_eq!(wmsctl(db, &receive).0, 0, "replayed");
    assert_eq!(
        wmsctl(db, &["receive", "--key", "r", "--sku", "S", "--qty", "2", "--location", "A"]).0,
        3
    );

    let (code, json, _) = wmsctl(db, &["keys", "stats", "-o", "json"]);
    assert_eq!(code, 0);
    let stats: Value = serde_json::from_str(&json).unwrap();
    assert_eq!((stats["live"].as_u64(), stats["expired"].as_u64()), (Some(2), Some(2)));
    assert_eq!((stats["replays"].as_u64(), stats["conflicts"].as_u64()), (Some(1), Some(1)));

    let (code, text, stderr) = wmsctl(db, &["keys", "stats", "-o", "prometheus"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("# TYPE wms_keys_live gauge\nwms_keys_live 2\n"), "{text}");
    assert!(text.contains("wms_keys_expired 2\n"), "{text}");
    assert!(text.contains("wms_key_replays_total{kind=\"receive\",user=\"cron\"} 1\n"), "{text}");
    assert!(text.contains("wms_key_conflicts_total{kind=\"receive\",user=\"cron\"} 1\n"), "{text}");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
    }
});

// A cleanup of 100,000 expired keys runs in short batches: postings started beside it all
// succeed, and it removes every expired key and nothing else.
idem_core::both_databases!(postings_beside_a_large_cleanup_all_succeed, |db| {
    use idem_core::{IdemKey, Operator, Posting, Request};
    let past = chrono::Utc::now() - chrono::TimeDelta::hours(2);
    let user = Operator::parse("cron").unwrap();
    let expired: Vec<Posting> = (0..100_000)
        .map(|i| {
            Posting::new(
                user.clone(),
                IdemKey::parse(&format!("old-{i}")).unwrap(),
                Request::receive("S", 1, "A").unwrap(),
            )
            .ttl(chrono::TimeDelta::hours(1))
            .unwrap()
        })
        .collect();
    for chunk in expired.chunks(5_000) {
        db.store().post_batch(chunk, past).await.unwrap();
    }

    let cleanup = Command::new(BIN)
        .args([
            "--no-dotenv",
            "--database-url",
            db.url(),
            "--user",
            "cron",
            "keys",
            "cleanup",
            "--batch-size",
            "2000",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let postings: Vec<_> = (0..12)
        .map(|i| {
            Command::new(BIN)
                .args([
                    "--no-dotenv",
                    "--database-url",
                    db.url(),
                    "--user",
                    "cron",
                    "receive",
                    "--key",
                    &format!("beside-{i}"),
                    "--sku",
                    "S",
                    "--qty",
                    "1",
                    "--location",
                    "B",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for posting in postings {
        let out = posting.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = cleanup.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["removed"], 100_000);

    let (_, listed, _) = wmsctl(db, &["keys", "list", "--limit", "1000", "-o", "json"]);
    let keys: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(keys.len(), 12, "only the live keys remain");
    assert!(keys.iter().all(|k| k["key"].as_str().unwrap().starts_with("beside-")));
});

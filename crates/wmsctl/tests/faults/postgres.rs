//! PostgreSQL faults: a server that never answers, a backend killed between the claim and the
//! commit, a crash in the middle of an import, and a COMMIT whose answer is lost.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use idem_core::testing::TestDb;
use sqlx::{Connection, PgConnection};

use crate::proxy::{CommitCutter, Cut};
use crate::server::PrivateServer;
use crate::support::*;

const NOT_COMMITTED: &str =
    "the database connection failed; nothing was committed, retrying with the same key is safe";

/// A listener that completes the TCP handshake and then never says a word, like a server
/// behind a stalled firewall or a hung host: the connection attempt is bounded by
/// `--connect-timeout` (or `WMS_CONNECT_TIMEOUT`), then exit code 69.
#[test]
fn server_that_accepts_but_never_answers_exits_69_after_the_connect_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let url = format!("postgres://op:s3cret-pw@127.0.0.1:{port}/wms");

    for (seconds, how) in [(1u64, "flag"), (2, "environment")] {
        let mut cmd = bare();
        cmd.args(["--database-url", &url, "--user", "alice"]);
        match how {
            "flag" => cmd.args(["--connect-timeout", &format!("{seconds}s")]),
            _ => cmd.env("WMS_CONNECT_TIMEOUT", format!("{seconds}s")),
        };
        let started = Instant::now();
        let out = run(&mut cmd, &strs(&receipt("k", 1)));
        let took = started.elapsed();

        assert_eq!(out.code, 69, "timeout by {how}: {}", out.stderr);
        assert!(out.stdout.is_empty());
        assert!(
            took >= Duration::from_millis(seconds * 1000 - 100)
                && took < Duration::from_secs(seconds + 3),
            "connect timeout {seconds}s by {how} gave up after {took:?}"
        );
        assert_eq!(
            out.stderr,
            format!(
                "wmsctl: database unavailable at postgres://op:****@127.0.0.1:{port}/wms: \
                 no answer within {seconds}s\n"
            )
        );
    }

    let help = run(&mut bare(), &["--help"]);
    assert!(
        help.stdout.contains("[env: WMS_CONNECT_TIMEOUT=]")
            && help.stdout.contains("[default: 5s]"),
        "{}",
        help.stdout
    );
}

/// The backend serving a posting is terminated after the key was claimed and before the
/// commit (the posting is held there by a row lock on its stock row): exit code 75, a message
/// that retrying is safe, nothing committed; the retry then applies exactly once.
#[tokio::test]
async fn backend_terminated_between_claim_and_commit_exits_75_and_the_retry_applies_once() {
    let Some(db) = TestDb::postgres().await else { return };
    let url = db.url();
    assert_eq!(run(&mut wmsctl(url), &strs(&receipt("first", 1))).code, 0);
    let before = snapshot(url).await;

    let mut locker = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT on_hand FROM stock WHERE sku = 'S' AND location = 'A' FOR UPDATE")
        .execute(&mut locker)
        .await
        .unwrap();
    let post_args = [receipt("cut-off", 5), vec!["-o".into(), "json".into()]].concat();
    let post = strs(&post_args);
    let child = spawn(&mut wmsctl(url), &post);
    let mut watcher = PgConnection::connect(url).await.unwrap();
    let pid = blocked_wmsctl_backend(&mut watcher).await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
    assert!(terminated);

    let out = finish(child.wait_with_output().unwrap());
    assert_eq!(out.code, 75, "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let error = json_error(&out);
    assert_eq!(error["code"], "connection_lost");
    assert!(error["message"].as_str().unwrap().starts_with(NOT_COMMITTED), "{error}");
    sqlx::raw_sql("ROLLBACK").execute(&mut locker).await.unwrap();
    assert_eq!(snapshot(url).await, before, "nothing of the posting was committed");

    let retried = run(&mut wmsctl(url), &post);
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    assert_eq!(json(&retried)["outcome"], "applied");
    assert_eq!(json(&run(&mut wmsctl(url), &post))["outcome"], "replayed");
    assert_eq!(ledger_rows_for_key(url, "cut-off").await, 1);
    assert_eq!(snapshot(url).await.0, [("S".to_owned(), "A".to_owned(), 6)]);
}

/// The server crashes (`pg_ctl restart -m immediate`) in the middle of an import: the first
/// chunks are committed, the next is held between its claims and its commit by a row lock on
/// one stock row. The import fails with exit code 75 and says re-running is safe; the committed
/// chunks survive the crash; and the re-run applies the rest and replays the committed lines,
/// each line exactly once.
#[tokio::test]
async fn crash_restart_during_an_import_exits_75_and_the_rerun_applies_each_line_once() {
    const COMMITTED: usize = 60;
    const LINES: usize = 120;
    let Some(server) = PrivateServer::start() else { return };
    let url = server.url();
    let migrated = run(&mut wmsctl(url), &["db", "migrate"]);
    assert_eq!(migrated.code, 0, "{}", migrated.stderr);
    assert_eq!(run(&mut wmsctl(url), &strs(&receipt("seed", 1))).code, 0);

    // Lines 1-60 go to location B, free; lines 61-120 to A, whose stock row will be locked.
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("batch.csv");
    let mut csv = String::from("key,kind,sku,qty,location,to_location,reference,reason\n");
    for line in 1..=LINES {
        let location = if line <= COMMITTED { "B" } else { "A" };
        csv.push_str(&format!("line-{line},receive,S,1,{location},,,\n"));
    }
    std::fs::write(&file, csv).unwrap();
    let file = file.display().to_string();
    let import = ["import", &file, "--chunk-size", "20", "-o", "json"];

    let mut locker = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT on_hand FROM stock WHERE sku = 'S' AND location = 'A' FOR UPDATE")
        .execute(&mut locker)
        .await
        .unwrap();
    let running = spawn(&mut wmsctl(url), &import);
    let mut watcher = PgConnection::connect(url).await.unwrap();
    blocked_wmsctl_backend(&mut watcher).await;
    server.crash_restart();

    let out = finish(running.wait_with_output().unwrap());
    assert_eq!(out.code, 75, "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    // The server's own farewell may come first, as a logged warning: plain text, no escapes.
    assert!(!out.stderr.contains('\u{1b}'), "escape codes in a log: {:?}", out.stderr);
    let error = json_error(&out);
    assert_eq!(error["code"], "connection_lost");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "{file}: the import stopped at lines {}-{}; re-running the import is safe",
            COMMITTED + 2,
            COMMITTED + 21
        )) && message.contains(NOT_COMMITTED),
        "{message}"
    );
    let mut after = PgConnection::connect(url).await.unwrap();
    assert_eq!(ledger_count(&mut after).await, 1 + COMMITTED, "the committed chunks survived");

    let rerun = run(&mut wmsctl(url), &import);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    let summary = json(&rerun);
    assert_eq!((summary["applied"].as_u64(), summary["replayed"].as_u64()), (Some(60), Some(60)));
    let per_key: Vec<(String, i64)> =
        sqlx::query_as("SELECT idem_key, count(*) FROM ledger GROUP BY idem_key ORDER BY idem_key")
            .fetch_all(&mut after)
            .await
            .unwrap();
    assert_eq!(per_key.len(), 1 + LINES, "{per_key:?}");
    assert!(per_key.iter().all(|(_, n)| *n == 1), "{per_key:?}");
    let stock = snapshot(url).await.0;
    assert_eq!(stock, [("S".to_owned(), "A".to_owned(), 61), ("S".to_owned(), "B".to_owned(), 60)]);
    drop(locker);
}

/// The connection drops right after the client's COMMIT: once after the server received it
/// (it committed), once before (it rolled back). Either way the client cannot know, says so
/// with exit code 75, and the retry with the same key resolves it: a replay of the committed
/// posting, or the posting applied now; never a second ledger row.
#[tokio::test]
async fn commit_whose_answer_is_lost_exits_75_and_the_retry_never_applies_twice() {
    let Some(db) = TestDb::postgres().await else { return };
    let upstream = authority(db.url());
    for (cut, retried_outcome) in
        [(Cut::AfterForwarding, "replayed"), (Cut::BeforeForwarding, "applied")]
    {
        let proxy = CommitCutter::start(upstream, cut);
        let url = with_port(db.url(), proxy.port());
        let key = format!("lost-{cut:?}");
        let post_args = [receipt(&key, 2), vec!["-o".into(), "json".into()]].concat();
        let post = strs(&post_args);

        let out = run(&mut wmsctl(&url), &post);
        assert!(proxy.has_cut(), "{cut:?}: the proxy saw no COMMIT");
        assert_eq!(out.code, 75, "{cut:?}: {}", out.stderr);
        assert!(out.stdout.is_empty());
        let error = json_error(&out);
        assert_eq!(error["code"], "outcome_unknown", "{cut:?}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "the connection failed during commit, so the outcome is unknown; retry with the \
                 same key: it applies the posting or returns the one already applied"
            ),
            "{message}"
        );

        let retried = run(&mut wmsctl(&url), &post);
        assert_eq!(retried.code, 0, "{cut:?}: {}", retried.stderr);
        assert_eq!(json(&retried)["outcome"], retried_outcome, "{cut:?}");
        assert_eq!(ledger_rows_for_key(db.url(), &key).await, 1, "{cut:?}");
    }
    assert_eq!(snapshot(db.url()).await.0, [("S".to_owned(), "A".to_owned(), 4)]);
}

fn spawn(cmd: &mut std::process::Command, args: &[&str]) -> Child {
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting wmsctl")
}

/// Waits for a wmsctl backend of this database to be blocked on a lock, and returns its pid.
async fn blocked_wmsctl_backend(watcher: &mut PgConnection) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'wmsctl' AND state = 'active' AND wait_event_type = 'Lock'",
        )
        .fetch_optional(&mut *watcher)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        assert!(Instant::now() < deadline, "no wmsctl backend got blocked on the row lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ledger_count(conn: &mut PgConnection) -> usize {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger").fetch_one(conn).await.unwrap();
    n as usize
}

/// `127.0.0.1:PORT` of a `postgres://user@127.0.0.1:PORT/db` URL.
fn authority(url: &str) -> SocketAddr {
    let rest = url.split_once('@').unwrap().1;
    rest.split('/').next().unwrap().parse().unwrap()
}

fn with_port(url: &str, port: u16) -> String {
    let (head, rest) = url.split_once('@').unwrap();
    let (_, tail) = rest.split_once('/').unwrap();
    format!("{head}@127.0.0.1:{port}/{tail}")
}

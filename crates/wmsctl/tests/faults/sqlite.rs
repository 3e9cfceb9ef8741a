//! SQLite faults: a write lock held past the retry budget, files the process may not write,
//! files that are not a wmsctl database, and a schema from a newer build.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use idem_core::testing::TestDb;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

use crate::support::*;

/// Another process holds the write lock for longer than `--busy-timeout` (or
/// `WMS_BUSY_TIMEOUT`): the posting gives up after about that long with exit code 75, says that
/// retrying is safe, and writes nothing; once the lock is released the same command applies
/// exactly once.
#[tokio::test]
async fn write_lock_held_past_the_busy_timeout_exits_75_then_the_retry_applies_once() {
    let db = TestDb::sqlite().await;
    let url = db.url();
    assert_eq!(run(&mut wmsctl(url), &strs(&receipt("before", 1))).code, 0);
    let before = snapshot(url).await;

    let mut holder = SqliteConnection::connect(url).await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut holder).await.unwrap();

    let post = receipt("locked-out", 5);
    for (timeout, how) in [(1, "flag"), (2, "environment")] {
        let mut cmd = wmsctl(url);
        match how {
            "flag" => cmd.args(["--busy-timeout", &format!("{timeout}s")]),
            _ => cmd.env("WMS_BUSY_TIMEOUT", format!("{timeout}s")),
        };
        let started = Instant::now();
        let out = run(&mut cmd, &[&strs(&post)[..], &["-o", "json"]].concat());
        let took = started.elapsed();

        assert_eq!(out.code, 75, "busy timeout by {how}: {}", out.stderr);
        assert!(out.stdout.is_empty());
        let error = json_error(&out);
        assert_eq!(error["code"], "db_busy");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("retrying with the same key is safe"), "{message}");
        assert!(
            took >= Duration::from_millis(timeout * 1000 - 100)
                && took < Duration::from_secs(timeout + 5),
            "busy timeout {timeout}s by {how} gave up after {took:?}"
        );
    }
    assert_eq!(snapshot(url).await, before, "a posting that gave up wrote nothing");

    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    let retried = run(&mut wmsctl(url), &[&strs(&post)[..], &["-o", "json"]].concat());
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    assert_eq!(json(&retried)["outcome"], "applied");
    let again = run(&mut wmsctl(url), &[&strs(&post)[..], &["-o", "json"]].concat());
    assert_eq!(json(&again)["outcome"], "replayed");
    assert_eq!(ledger_rows_for_key(url, "locked-out").await, 1);
    assert_eq!(snapshot(url).await.0, [("S".to_owned(), "A".to_owned(), 6)]);
}

/// A database file, or the directory it lives in, that the operator may not write: exit code 77
/// with a message that names the file, and the file unchanged. As root, file modes do not stop
/// writes, so the command runs as `nobody` there.
#[tokio::test]
async fn read_only_file_or_directory_exits_77_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let program = binary_copy_in(dir.path());
    let data = dir.path().join("data");
    let path = data.join("wms.db");
    let url = format!("sqlite://{}", path.display());
    assert_eq!(run(&mut wmsctl(&url), &strs(&receipt("mine", 3))).code, 0);
    let before = snapshot(&url).await;
    let as_operator = || {
        let mut cmd = bare_at(&program);
        cmd.args(["--database-url", &url, "--user", "alice"]);
        if running_as_root() {
            cmd.uid(65534).gid(65534);
        }
        cmd
    };
    let set_mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode(dir.path(), 0o755);

    // The file is readable but not writable; then the directory is not writable, so SQLite
    // cannot create the write-ahead log beside a file the user owns.
    let owner_of_file = if running_as_root() { Some(65534) } else { None };
    for case in ["read-only file", "read-only directory"] {
        match case {
            "read-only file" => {
                set_mode(&data, 0o755);
                set_mode(&path, 0o444);
            }
            _ => {
                std::os::unix::fs::chown(&path, owner_of_file, None).unwrap();
                set_mode(&path, 0o600);
                set_mode(&data, 0o555);
            }
        }
        let bytes = std::fs::read(&path).unwrap();
        let out = run(&mut as_operator(), &strs(&receipt("refused", 2)));
        assert_eq!(out.code, 77, "{case}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{case}");
        assert!(
            out.stderr.starts_with("wmsctl: permission denied by the database: cannot write ")
                && out.stderr.contains(&path.display().to_string()),
            "{case}: {}",
            out.stderr
        );
        assert_eq!(out.stderr.matches("readonly database").count(), 1, "{}", out.stderr);
        assert!(std::fs::read(&path).unwrap() == bytes, "{case}: the file changed");
        let json =
            run(&mut as_operator(), &[&strs(&receipt("refused", 2))[..], &["-o", "json"]].concat());
        assert_eq!(json_error(&json)["code"], "permission_denied", "{case}");
    }
    set_mode(&data, 0o700);
    assert_eq!(snapshot(&url).await, before, "nothing was written");
}

/// Random bytes where the database should be, and a SQLite file of some other program: exit
/// code 78 naming the file, and the file untouched (never migrated into a wmsctl database).
#[tokio::test]
async fn file_that_is_not_a_wmsctl_database_exits_78_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let random = dir.path().join("random.db");
    let noise: Vec<u8> =
        (0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&random, &noise).unwrap();

    let foreign = dir.path().join("foreign.db");
    let options = SqliteConnectOptions::new().filename(&foreign).create_if_missing(true);
    let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL); \
         INSERT INTO invoices (total) VALUES (9.5);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    for path in [&random, &foreign] {
        let bytes = std::fs::read(path).unwrap();
        let url = format!("sqlite://{}", path.display());
        let post = receipt("k", 1);
        for args in [&strs(&post)[..], &["stock"], &["db", "status"], &["db", "migrate"]] {
            let out = run(&mut wmsctl(&url), args);
            assert_eq!(out.code, 78, "{} {args:?}: {}", path.display(), out.stderr);
            assert!(out.stdout.is_empty());
            let expected = format!("wmsctl: {} is not a wmsctl database", path.display());
            assert!(out.stderr.starts_with(&expected), "{}", out.stderr);
            assert!(out.stderr.matches("file is not a database").count() <= 1, "{}", out.stderr);
            assert!(std::fs::read(path).unwrap() == bytes, "{} changed", path.display());
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with("-wal") || n.ends_with("-shm") || n.ends_with("-journal"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A file with a migrations table this build cannot read (another program's, of another
/// shape) is reported as such and left alone: it is never taken for a new file and migrated.
#[tokio::test]
async fn unreadable_migrations_table_is_reported_and_the_file_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE _sqlx_migrations (version INTEGER, note TEXT); \
         INSERT INTO _sqlx_migrations VALUES (1, 'theirs');",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let url = format!("sqlite://{}", path.display());

    for args in [&["stock"][..], &["keys", "exists", "k"]] {
        let out = run(&mut wmsctl(&url), args);
        assert_eq!(out.code, 70, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("reading the schema version"), "{}", out.stderr);
        assert!(out.stderr.contains("no such column: success"), "{}", out.stderr);
    }
    let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(tables, ["_sqlx_migrations"], "nothing was migrated into the file");
}

/// The filesystem under the database fills up: the posting fails with exit code 75 and says
/// why and that retrying is safe, nothing of it is written and the file stays sound
/// (`PRAGMA integrity_check`); once space is freed the same command applies exactly once.
///
/// A small tmpfs is the full disk, so the test needs to mount one (it does as root, which CI
/// is); elsewhere it says so loudly and checks nothing.
#[tokio::test]
async fn disk_full_exits_75_rolls_back_and_the_retry_applies_once_after_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path(), "2m") else { return };
    let path = disk.path.join("wms.db");
    let url = format!("sqlite://{}", path.display());
    assert_eq!(run(&mut wmsctl(&url), &strs(&receipt("seed", 1))).code, 0);

    // An open connection keeps the shared-memory file mapped and the log in place, as a busy
    // warehouse would; the log is emptied so that the next posting must grow it.
    let mut watcher = SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut watcher).await.unwrap();
    let before = snapshot(&url).await;
    let filler = disk.fill();

    let post = [receipt("no-room", 5), vec!["-o".into(), "json".into()]].concat();
    let out = run(&mut wmsctl(&url), &strs(&post));
    assert_eq!(out.code, 75, "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let error = json_error(&out);
    assert_eq!(error["code"], "storage_full", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "the database or its disk is full; the transaction was rolled back, so retrying with \
             the same key is safe once there is room"
        ),
        "{message}"
    );
    let integrity: String =
        sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut watcher).await.unwrap();
    assert_eq!(integrity, "ok");
    assert_eq!(snapshot(&url).await, before, "nothing of the posting was written");

    std::fs::remove_file(filler).unwrap();
    let retried = run(&mut wmsctl(&url), &strs(&post));
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    assert_eq!(json(&retried)["outcome"], "applied");
    assert_eq!(json(&run(&mut wmsctl(&url), &strs(&post)))["outcome"], "replayed");
    assert_eq!(ledger_rows_for_key(&url, "no-room").await, 1);
    watcher.close().await.unwrap();
    let integrity = run(&mut wmsctl(&url), &["stock", "--verify"]);
    assert_eq!(integrity.code, 0, "{}", integrity.stderr);
}

/// A tmpfs of a given size mounted on a directory, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Option<SmallDisk> {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(SmallDisk { path: at.to_owned() }),
            // As root (as in CI) the mount must work: a skip there would hide the test.
            other if running_as_root() => panic!("cannot mount a tmpfs as root: {other:?}"),
            other => {
                use std::io::Write;
                writeln!(
                    std::io::stderr(),
                    "SKIPPING the disk-full test: cannot mount a tmpfs here ({other:?}); it runs \
                     as root, as in CI, and fails there if it cannot"
                )
                .ok();
                None
            }
        }
    }

    /// Writes a file until the disk is full, and returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in [64 * 1024, 4096, 512, 1] {
            let block = vec![0xa5u8; chunk];
            while file.write_all(&block).and_then(|()| file.sync_all()).is_ok() {}
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

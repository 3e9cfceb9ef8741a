//! Operator isolation on PostgreSQL, enforced by the database: an operator role neither sees
//! nor consumes another operator's keys, through wmsctl or through psql with SQL of its own,
//! while an administrator sees everything, acts for others and cleans up. On SQLite the file
//! and its directory are the operator's own.

use std::process::Command;

use idem_core::testing::TestDb;
use sqlx::{Connection, PgConnection};

use crate::server::pg_program;
use crate::support::*;

/// Role names are per server, and tests share the server: every test makes its own.
fn role(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// The test database's URL, connecting as `role` (the test server trusts local connections).
fn as_role(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    format!("{scheme}://{role}@{}", rest.split_once('@').unwrap().1)
}

/// `wmsctl` connected as `role`, with no `--user`: the identity comes from the role.
fn wmsctl_as(url: &str, role: &str) -> Command {
    let mut cmd = bare();
    cmd.args(["--database-url", &as_role(url, role)]);
    cmd
}

/// Runs SQL through the real psql, connected as `role`, and returns what it printed.
fn psql_as(url: &str, role: &str, sql: &str) -> String {
    let out = Command::new(pg_program("psql"))
        .args(["--no-psqlrc", "--no-align", "--tuples-only", "-v", "ON_ERROR_STOP=0", "-d"])
        .arg(as_role(url, role))
        .args(["-c", sql])
        .output()
        .expect("running psql");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn operators_see_and_consume_only_their_own_keys_even_through_psql() {
    let Some(db) = TestDb::postgres().await else { return };
    let url = db.url();
    let (alice, bob, boss) = (role("op_alice"), role("op_bob"), role("adm_boss"));
    let roles = RoleGuard::new(url, [&alice, &bob, &boss]);

    for name in [&alice, &bob] {
        let granted = run(
            bare().args(["--database-url", url]),
            &["db", "grant-operator", name, "-o", "json"],
        );
        assert_eq!(granted.code, 0, "{}", granted.stderr);
        assert_eq!(json(&granted)["created"], true);
        assert!(granted.stderr.contains("without a password"), "{}", granted.stderr);
    }
    let again = run(bare().args(["--database-url", url]), &["db", "grant-operator", &alice]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stderr.contains("was already an operator"), "{}", again.stderr);
    let mut admin = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{boss}\" LOGIN; GRANT wms_admin TO \"{boss}\""
    )))
    .execute(&mut admin)
    .await
    .unwrap();

    // Bob posts under a key; his identity is his role, whatever the login name.
    let post = [receipt("pallet-7", 5), vec!["-o".into(), "json".into()]].concat();
    let bobs = run(&mut wmsctl_as(url, &bob), &strs(&post));
    assert_eq!(bobs.code, 0, "{}", bobs.stderr);
    assert_eq!(json(&bobs)["user"], bob.as_str());
    let refused = run(wmsctl_as(url, &bob).args(["--user", &alice]), &strs(&post));
    assert_eq!(refused.code, 77, "{}", refused.stderr);
    assert_eq!(json_error(&refused)["code"], "permission_denied");
    assert_eq!(
        json_error(&refused)["message"],
        format!(
            "connected as database role {bob}, an operator who acts only as {bob}: --user \
             {alice} is refused; acting for another operator takes an administrator role"
        )
    );

    // Alice cannot see Bob's key, and the same key is a fresh key of her own.
    let shown = run(&mut wmsctl_as(url, &alice), &["keys", "show", "pallet-7", "-o", "json"]);
    assert_eq!((shown.code, json(&shown)["state"].as_str()), (1, Some("unknown")));
    let everyone = run(&mut wmsctl_as(url, &alice), &["keys", "list", "--all-users", "-o", "json"]);
    assert_eq!(json(&everyone), serde_json::json!([]), "an operator lists only its own keys");
    let peek = run(wmsctl_as(url, &alice).args(["--user", &bob]), &["keys", "exists", "pallet-7"]);
    assert_eq!(peek.code, 77, "{}", peek.stderr);
    let alices = run(&mut wmsctl_as(url, &alice), &strs(&post));
    assert_eq!(json(&alices)["outcome"], "applied", "{}", alices.stderr);
    assert_eq!(json(&alices)["user"], alice.as_str());
    let audit = run(&mut wmsctl_as(url, &alice), &["audit", "list", "-o", "json"]);
    assert!(json(&audit).as_array().unwrap().iter().all(|e| e["actor"] == alice.as_str()));
    let cleanup = run(&mut wmsctl_as(url, &alice), &["keys", "cleanup"]);
    assert_eq!(cleanup.code, 77, "cleanup is for administrators: {}", cleanup.stderr);

    // Hand-written SQL as Alice, through psql: nothing of Bob's to see, change or forge.
    let b = bob.as_str();
    assert_eq!(
        psql_as(url, &alice, &format!("SELECT count(*) FROM idem_keys WHERE user_name = '{b}'")),
        "0\n"
    );
    assert_eq!(psql_as(url, &alice, "SELECT count(*) FROM idem_keys"), "1\n");
    assert_eq!(
        psql_as(
            url,
            &alice,
            &format!(
                "UPDATE idem_keys SET fingerprint = 'x', expires_at = now() WHERE user_name = '{b}'"
            )
        ),
        "UPDATE 0\n"
    );
    let deleted = psql_as(url, &alice, "DELETE FROM idem_keys");
    assert!(deleted.contains("permission denied for table idem_keys"), "{deleted}");
    let forged = psql_as(
        url,
        &alice,
        &format!(
            "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, \
             created_at, expires_at) VALUES ('{b}', 'forged', 'receive', 'x', '{{}}', now(), \
             now() + interval '1 day')"
        ),
    );
    assert!(forged.contains("new row violates row-level security policy"), "{forged}");
    let forged_ledger = psql_as(
        url,
        &alice,
        &format!(
            "INSERT INTO ledger (id, kind, sku, qty, location, user_name, idem_key, created_at) \
             VALUES (gen_random_uuid(), 'receive', 'S', 1, 'A', '{b}', 'forged', now())"
        ),
    );
    assert!(
        forged_ledger.contains("new row violates row-level security policy"),
        "{forged_ledger}"
    );
    assert_eq!(
        psql_as(url, &alice, &format!("SELECT count(*) FROM audit_log WHERE actor = '{b}'")),
        "0\n"
    );

    // Bob's key is untouched: his retry replays his own transaction.
    let replay = run(&mut wmsctl_as(url, &bob), &strs(&post));
    assert_eq!(json(&replay)["outcome"], "replayed", "{}", replay.stderr);
    assert_eq!(json(&replay)["transaction"]["id"], json(&bobs)["transaction"]["id"]);
    let record = run(&mut wmsctl_as(url, &bob), &["keys", "show", "pallet-7", "-o", "json"]);
    assert_eq!(json(&record)["replay_count"], 1);

    // An administrator sees everyone, acts for them, and cleans up.
    let all = run(&mut wmsctl_as(url, &boss), &["keys", "list", "--all-users", "-o", "json"]);
    assert_eq!(all.code, 0, "{}", all.stderr);
    assert_eq!(json(&all).as_array().unwrap().len(), 2);
    let for_bob = run(
        wmsctl_as(url, &boss).args(["--user", &bob]),
        &["keys", "show", "pallet-7", "-o", "json"],
    );
    assert_eq!(json(&for_bob)["user"], bob.as_str(), "{}", for_bob.stderr);
    let swept = run(&mut wmsctl_as(url, &boss), &["keys", "cleanup"]);
    assert_eq!(swept.code, 0, "{}", swept.stderr);
    assert_eq!(snapshot(url).await.0, [("S".to_owned(), "A".to_owned(), 10)]);
    drop(roles);
}

/// `db grant-operator` on SQLite says that roles are a PostgreSQL matter; an unmigrated
/// PostgreSQL database points to `db migrate`.
#[tokio::test]
async fn grant_operator_needs_postgresql() {
    let db = TestDb::sqlite().await;
    let out = run(&mut wmsctl(db.url()), &["db", "grant-operator", "carol"]);
    assert_eq!(out.code, 78, "{}", out.stderr);
    assert!(out.stderr.contains("operator roles exist only on PostgreSQL"), "{}", out.stderr);
    let bad = run(&mut wmsctl(db.url()), &["db", "grant-operator", "carol; DROP ROLE x"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.starts_with("wmsctl: invalid user: may contain only"), "{}", bad.stderr);
}

/// On SQLite the database file, its directory and the lock files beside it are the operator's
/// alone, whatever the umask.
#[test]
fn sqlite_files_are_created_owner_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/nested/wms.db");
    let script = format!(
        "umask 000; exec \"$0\" --no-dotenv --database-url sqlite://{} --user u receive \
         --key k --sku S --qty 1 --location A",
        path.display()
    );
    let out = finish(Command::new("sh").args(["-c", &script]).arg(BIN).output().unwrap());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    for entry in std::fs::read_dir(path.parent().unwrap()).unwrap() {
        let entry = entry.unwrap().path();
        assert_eq!(mode(&entry), 0o600, "{}", entry.display());
    }
}

/// Drops the test's roles at the end, even on panic, once nothing uses them.
struct RoleGuard {
    url: String,
    names: Vec<String>,
}

impl RoleGuard {
    fn new<'a>(url: &str, names: impl IntoIterator<Item = &'a String>) -> RoleGuard {
        RoleGuard { url: url.to_owned(), names: names.into_iter().cloned().collect() }
    }
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        let sql: String = self
            .names
            .iter()
            .map(|n| format!("DROP OWNED BY \"{n}\"; DROP ROLE IF EXISTS \"{n}\";"))
            .collect();
        let _ = Command::new(pg_program("psql"))
            .args(["--no-psqlrc", "-q", "-d", &self.url, "-c", &sql])
            .output();
    }
}

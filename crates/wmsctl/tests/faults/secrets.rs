//! Passwords in database URLs never reach the screen: not in `--help`, errors, `-v` to `-vvv`
//! logs, `db status` or JSON errors, whichever way the URL was given and whether the server
//! accepts it, refuses it or cannot be reached.

use std::process::Command;

use sqlx::{Connection, PgConnection};

use crate::server::PrivateServer;
use crate::support::*;

const PASSWORD: &str = "Pw-s3cret-9Zq";

#[tokio::test]
async fn passwords_never_appear_in_output_logs_or_errors() {
    let Some(server) = PrivateServer::start() else { return };
    let mut admin = PgConnection::connect(server.url()).await.unwrap();
    for statement in [
        format!("CREATE ROLE wms_pw LOGIN PASSWORD '{PASSWORD}'"),
        "CREATE DATABASE wms_pw OWNER wms_pw".to_owned(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await.unwrap();
    }
    // Only this role must prove its password; everything else stays trusted.
    server.prepend_hba("host all wms_pw 127.0.0.1/32 scram-sha-256");

    let hostport = server.url().split_once('@').unwrap().1.split_once('/').unwrap().0.to_owned();
    let good = format!("postgres://wms_pw:{PASSWORD}@{hostport}/wms_pw");
    let in_query = format!("postgres://wms_pw@{hostport}/wms_pw?password={PASSWORD}");
    let wrong = format!("postgres://wms_pw:{PASSWORD}-wrong@{hostport}/wms_pw");
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let unreachable = format!("postgres://wms_pw:{PASSWORD}@127.0.0.1:{closed_port}/wms_pw");
    let malformed = format!("postgres://wms_pw:{PASSWORD}@{hostport}:99999/wms_pw");

    let mut checked = 0;
    let mut check = |cmd: &mut Command, args: &[&str], expected: i32| {
        let out = run(cmd, args);
        let all = format!("{}{}", out.stdout, out.stderr);
        assert_eq!(out.code, expected, "{args:?}: {all}");
        assert!(!all.contains(PASSWORD), "password shown by {args:?}:\n{all}");
        checked += 1;
        out
    };
    let with_url = |url: &str| {
        let mut cmd = bare();
        cmd.args(["--database-url", url, "--user", "alice"]);
        cmd
    };

    // Before and after migrating, through the flag and both environment variables. The owner
    // may not create roles, so the operator-isolation migration is refused until a superuser
    // has created the two group roles, the way docs/operators.md describes.
    check(&mut with_url(&good), &["db", "status", "-vv"], 1);
    let denied = check(&mut with_url(&good), &["db", "migrate", "-vvv"], 77);
    assert!(
        denied.stderr.contains(
            "migration 2: permission denied to create role; it creates the group roles \
             wms_operator and wms_admin unless they exist, which needs CREATEROLE"
        ),
        "{}",
        denied.stderr
    );
    sqlx::raw_sql("CREATE ROLE wms_operator NOLOGIN; CREATE ROLE wms_admin NOLOGIN")
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    check(&mut with_url(&good), &["db", "migrate", "-vvv"], 0);
    let status = check(&mut with_url(&good), &["db", "status", "-v"], 0);
    assert!(status.stderr.contains(&format!("postgres://wms_pw:****@{hostport}/wms_pw")));
    for verbosity in ["-q", "-v", "-vv", "-vvv"] {
        let post = receipt("secret-1", 3);
        check(&mut with_url(&good), &[&strs(&post)[..], &[verbosity]].concat(), 0);
        check(
            &mut with_url(&in_query),
            &[&strs(&post)[..], &[verbosity, "-o", "json"]].concat(),
            0,
        );
    }
    check(
        &mut with_url(&good),
        &["receive", "--key", "secret-1", "--sku", "S", "--qty", "4", "--location", "A", "-vv"],
        3,
    );
    check(
        &mut with_url(&good),
        &[
            "ship",
            "--key",
            "short",
            "--sku",
            "S",
            "--qty",
            "99",
            "--location",
            "A",
            "-vv",
            "-o",
            "json",
        ],
        65,
    );
    check(
        &mut with_url(&good),
        &["receive", "--key", "bad key", "--sku", "S", "--qty", "1", "--location", "A", "-vv"],
        2,
    );
    for args in [
        &["stock", "-vvv"][..],
        &["stock", "--verify", "-vv"],
        &["tx", "list", "-vv"],
        &["keys", "list", "--all-users", "-vv"],
        &["keys", "show", "secret-1", "-vv"],
        &["keys", "exists", "secret-1", "-vv"],
        &["audit", "list", "-vvv"],
    ] {
        check(&mut with_url(&good), args, 0);
    }
    let posted = check(&mut with_url(&good), &["tx", "list", "-o", "json"], 0);
    let id = json(&posted)[0]["id"].as_str().unwrap().to_owned();
    check(&mut with_url(&good), &["tx", "show", &id, "-vv"], 0);
    check(&mut with_url(&good), &["keys", "stats", "-o", "prometheus", "-vv"], 0);
    check(&mut with_url(&good), &["keys", "cleanup", "-vvv"], 0);
    check(&mut with_url(&good), &["keys", "cleanup", "--dry-run", "-o", "json", "-vv"], 0);

    // An import's summary, its FILE:LINE errors and its reject file.
    let files = tempfile::tempdir().unwrap();
    let input = files.path().join("lines.csv");
    std::fs::write(
        &input,
        "key,kind,sku,qty,location\nimp-1,receive,S,2,A\nimp-2,ship,S,999,A\nimp-3,receive,S,0,A\n",
    )
    .unwrap();
    let rejects = files.path().join("refused.csv");
    for verbosity in ["-v", "-vvv"] {
        let mut import = with_url(&good);
        import.arg("import").arg(&input).arg("--reject-file").arg(&rejects);
        let out = check(&mut import, &[verbosity], 65);
        assert!(out.stderr.contains("lines.csv:3:"), "{}", out.stderr);
        let refused = std::fs::read_to_string(&rejects).unwrap();
        assert!(refused.contains("imp-2") && !refused.contains(PASSWORD), "{refused}");
    }
    let mut import = with_url(&good);
    import.arg("import").arg(&input).args(["-o", "jsonl"]);
    check(&mut import, &[], 65);

    // A bug in wmsctl: a panic that quotes the URL prints it masked and exits 70, not 101.
    for url in [&good, &in_query] {
        let mut buggy = with_url(url);
        buggy.env("WMSCTL_PANIC_FOR_TEST", format!("lost the connection to {url} mid-call"));
        let out = check(&mut buggy, &["stock"], 70);
        assert!(out.stderr.contains("wmsctl: internal error, a bug in wmsctl"), "{}", out.stderr);
        assert!(
            out.stderr.contains(&format!("wms_pw{}", if url == &good { ":****@" } else { "@" }))
        );
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }

    for var in ["WMS_DATABASE_URL", "DATABASE_URL"] {
        check(bare().env(var, &good).args(["--user", "alice"]), &["stock", "-vv"], 0);
        check(bare().env(var, &wrong).args(["--user", "alice"]), &["stock", "-vv"], 77);
        check(bare().env(var, &good), &["--help"], 0);
        check(bare().env(var, &good), &["receive", "--help"], 0);
        check(bare().env(var, &good), &["db", "--help"], 0);
    }

    // Refused, unreachable and malformed: the errors name the server, never the password.
    for verbosity in ["-v", "-vvv"] {
        let refused = check(&mut with_url(&wrong), &["stock", verbosity], 77);
        assert!(refused.stderr.contains("password authentication failed"), "{}", refused.stderr);
        let down = check(&mut with_url(&unreachable), &["stock", verbosity], 69);
        assert!(down.stderr.contains("wms_pw:****@127.0.0.1"), "{}", down.stderr);
        check(&mut with_url(&malformed), &["stock", verbosity], 78);
        check(&mut with_url(&unreachable), &["db", "status", verbosity, "-o", "json"], 69);
    }
    assert!(checked >= 40, "only {checked} commands checked");
}

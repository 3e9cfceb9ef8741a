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

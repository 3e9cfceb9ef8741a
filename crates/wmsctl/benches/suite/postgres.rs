//! The PostgreSQL server a run measures: the one `WMS_BENCH_PG_URL` names, or a throwaway one
//! started with `scripts/pg-tmp` and stopped again when the run ends, panics included. Every
//! figure gets a database of its own, created here and dropped after it.

use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

/// The administrator URL of the server to measure; the run creates and drops databases on it.
pub const URL_VAR: &str = "WMS_BENCH_PG_URL";

#[derive(Debug)]
pub struct Server {
    admin_url: String,
    /// Set when this run started the server; dropping it stops the server.
    _owned: Option<OwnedServer>,
}

#[derive(Debug)]
struct OwnedServer {
    script: PathBuf,
    // Dropped after `Drop::drop` has stopped the server, so the files outlive it.
    dir: TempDir,
}

impl Drop for OwnedServer {
    fn drop(&mut self) {
        let stopped = Command::new(&self.script).arg("stop").arg(self.dir.path()).status();
        if !stopped.is_ok_and(|s| s.success()) {
            eprintln!(
                "bench: could not stop the PostgreSQL server in {}",
                self.dir.path().display()
            );
        }
    }
}

impl Server {
    /// Uses `WMS_BENCH_PG_URL`, or starts a server of its own with `scripts/pg-tmp`.
    pub fn start(workspace: &Path) -> Server {
        if let Some(url) = std::env::var(URL_VAR).ok().filter(|u| !u.is_empty()) {
            return Server { admin_url: url, _owned: None };
        }
        // Directly under /tmp: as root the server runs as `postgres`, which must reach it.
        let dir = tempfile::Builder::new()
            .prefix("wms-bench-pg-")
            .tempdir_in("/tmp")
            .expect("creating a directory for PostgreSQL");
        let script = workspace.join("scripts/pg-tmp");
        let output = Command::new(&script)
            .arg("start")
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        let owned = OwnedServer { script, dir };
        assert!(
            output.status.success(),
            "scripts/pg-tmp start failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let admin_url = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        Server { admin_url, _owned: Some(owned) }
    }

    pub fn owned(&self) -> bool {
        self._owned.is_some()
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        self.admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        self.admin(&format!("CREATE DATABASE {name}")).await;
        with_database(&self.admin_url, name)
    }

    /// Creates a database as a copy of `template`, which nobody may be connected to.
    pub async fn copy_database(&self, template: &str, name: &str) -> String {
        self.admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        self.admin(&format!("CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")).await;
        with_database(&self.admin_url, name)
    }

    pub async fn drop_database(&self, name: &str) {
        self.admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    }

    async fn admin(&self, sql: &str) {
        let mut conn = PgConnection::connect(&self.admin_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.admin_url));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        conn.close().await.ok();
    }

    pub async fn version(&self) -> String {
        let mut conn = PgConnection::connect(&self.admin_url).await.expect("connecting");
        let version: String =
            sqlx::query_scalar("SHOW server_version").fetch_one(&mut conn).await.expect("version");
        conn.close().await.ok();
        format!("PostgreSQL {version}")
    }
}

/// The same server URL with another database name.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{scheme}://{authority}/{name}{query}")
}

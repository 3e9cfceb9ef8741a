//! A PostgreSQL server of a test's own, for tests that restart it or change how it
//! authenticates: started with `scripts/pg-tmp` in a temporary directory and stopped when the
//! guard is dropped, even when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::running_as_root;

const PG_TMP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pg-tmp");

#[derive(Debug)]
pub struct PrivateServer {
    dir: tempfile::TempDir,
    url: String,
}

impl PrivateServer {
    /// Starts a fresh cluster; the URL is the `postgres` superuser's, with trust authentication.
    /// Without PostgreSQL's server programs this returns `None` after a note, like every other
    /// PostgreSQL test, unless `WMS_REQUIRE_PG=1` makes that a failure.
    pub fn start() -> Option<PrivateServer> {
        if !pg_program("initdb").exists() {
            let required =
                std::env::var(idem_core::testing::REQUIRE_PG_VAR).is_ok_and(|v| v == "1");
            assert!(!required, "PostgreSQL's server programs are needed for this test");
            use std::io::Write;
            writeln!(
                std::io::stderr(),
                "skipping PostgreSQL test: no PostgreSQL server programs to start a server with"
            )
            .ok();
            return None;
        }
        // Under /tmp: as root the server runs as `postgres`, which must reach the directory.
        let dir = tempfile::Builder::new().prefix("wms-faults-pg-").tempdir_in("/tmp").unwrap();
        let out = Command::new(PG_TMP)
            .arg("start")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("running scripts/pg-tmp");
        assert!(
            out.status.success(),
            "scripts/pg-tmp start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Some(PrivateServer { dir, url })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `pg_ctl restart -m immediate`: every backend is killed at once, as in a crash, and the
    /// server comes back on the same port after crash recovery.
    pub fn crash_restart(&self) {
        let log = self.dir.path().join("server.log");
        let status = self
            .pg_ctl()
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "60", "-l"])
            .arg(&log)
            .arg("restart")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running pg_ctl");
        assert!(status.success(), "pg_ctl restart failed; see {}", log.display());
    }

    /// Adds a line at the top of `pg_hba.conf` (the first matching line wins) and reloads.
    pub fn prepend_hba(&self, line: &str) {
        let hba = self.data().join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(&hba, format!("{line}\n{old}")).unwrap();
        let status = self
            .pg_ctl()
            .arg("-D")
            .arg(self.data())
            .arg("reload")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl reload failed");
    }

    /// `pg_ctl`, as the cluster's owner.
    fn pg_ctl(&self) -> Command {
        let pg_ctl = pg_program("pg_ctl");
        if running_as_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(pg_ctl);
            cmd
        } else {
            Command::new(pg_ctl)
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = Command::new(PG_TMP)
            .arg("stop")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A PostgreSQL client or server program of the installation `scripts/pg-tmp` uses: beside the
/// real `pg_ctl` (the one on the PATH is often a symbolic link), else on the PATH.
pub fn pg_program(name: &str) -> PathBuf {
    let pg_ctl = pg_bindir().join("pg_ctl");
    let real_bindir =
        std::fs::canonicalize(&pg_ctl).ok().and_then(|p| Some(p.parent()?.to_owned()));
    [real_bindir, Some(pg_bindir())]
        .into_iter()
        .flatten()
        .map(|dir| dir.join(name))
        .find(|program| program.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Where the server binaries are: beside `initdb` on the PATH, else the newest Debian install,
/// as `scripts/pg-tmp` finds them.
fn pg_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    }) {
        return dir;
    }
    let mut installed: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    installed.sort();
    installed.pop().map(|(_, bin)| bin).unwrap_or_else(|| Path::new("/usr/bin").to_owned())
}

//! Running the real binary and reading what it left behind, shared by the fault tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use idem_core::{Store, StoreOptions};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_wmsctl");

/// `wmsctl` with nothing inherited that could change its behaviour.
pub fn bare() -> Command {
    bare_at(Path::new(BIN))
}

/// Like [`bare`], but running the binary at `program` (a copy another user can reach).
pub fn bare_at(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "WMS_DATABASE_URL",
        "DATABASE_URL",
        "WMS_USER",
        "WMS_KEY_TTL",
        "WMS_BUSY_TIMEOUT",
        "WMS_CONNECT_TIMEOUT",
        "NO_COLOR",
        "WMS_LOG",
        "RUST_LOG",
        "PGPASSWORD",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("--no-dotenv").stdin(Stdio::null());
    cmd
}

/// `wmsctl` on `url` as operator `alice`.
pub fn wmsctl(url: &str) -> Command {
    let mut cmd = bare();
    cmd.args(["--database-url", url, "--user", "alice"]);
    cmd
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command, args: &[&str]) -> Run {
    finish(cmd.args(args).output().expect("running wmsctl"))
}

pub fn finish(output: Output) -> Run {
    let Output { status, stdout, stderr } = output;
    Run {
        code: status.code().unwrap_or_else(|| panic!("wmsctl died without a code: {status}")),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

pub fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}): {:?}\nstderr: {}", run.stdout, run.stderr)
    })
}

/// The JSON error object a failed command prints on stderr with `-o json`.
pub fn json_error(run: &Run) -> Value {
    let line = run.stderr.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("stderr does not end in a JSON error ({e}): {:?}", run.stderr));
    value["error"].clone()
}

/// The arguments of a receipt of `qty` of `S` at `A` under `key`.
pub fn receipt(key: &str, qty: u32) -> Vec<String> {
    ["receive", "--key", key, "--sku", "S", "--qty", &qty.to_string(), "--location", "A"]
        .map(str::to_owned)
        .to_vec()
}

pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Stock rows, ledger rows and key rows, read with a fresh connection: what a failed command
/// must not have changed.
pub async fn snapshot(url: &str) -> (Vec<(String, String, i64)>, usize, usize) {
    let store = Store::connect(url, &StoreOptions::default()).await.expect("reading the database");
    let stock = store
        .stock(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.sku, l.location, l.on_hand))
        .collect();
    let ledger = store.transactions(&Default::default()).await.unwrap().len();
    let keys = store.keys(&Default::default(), chrono::Utc::now()).await.unwrap().len();
    store.close().await;
    (stock, ledger, keys)
}

/// Ledger rows posted under `key`, by anyone.
pub async fn ledger_rows_for_key(url: &str, key: &str) -> usize {
    let store = Store::connect(url, &StoreOptions::default()).await.expect("reading the database");
    let rows = store.transactions(&Default::default()).await.unwrap();
    store.close().await;
    rows.iter().filter(|t| t.key == key).count()
}

/// True when the tests run as root, where file modes do not stop writes.
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A copy of the binary in `dir`, world-readable and executable, so that an unprivileged user
/// can run it wherever the build directory lives (CI clones under `/root`, which `nobody`
/// cannot enter).
pub fn binary_copy_in(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join("wmsctl");
    std::fs::copy(BIN, &copy).expect("copying the wmsctl binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

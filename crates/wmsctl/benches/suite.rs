//! The performance suite: every figure of the performance goals, each measured against a
//! hand-written baseline in the same run with the two sides taking turns, on SQLite and on
//! PostgreSQL. It prints a table of medians and ratios with the machine it ran on and writes
//! the figures to `target/bench/results.json`. The README's Performance section explains them.
//!
//! ```text
//! cargo bench -p wmsctl --bench suite                   # everything, the goals' sizes
//! cargo bench -p wmsctl --bench suite -- --quick        # small sizes, seconds (or WMS_BENCH_QUICK=1)
//! cargo bench -p wmsctl --bench suite -- calls import   # only some groups
//! ```
//!
//! Groups: `calls` (one process call per posting or lookup), `rate` (postings in one process),
//! `clients` (eight PostgreSQL clients at once), `import`, `memory`, `cleanup`. PostgreSQL is a
//! throwaway server started with `scripts/pg-tmp`, unless `WMS_BENCH_PG_URL` names one (its
//! user must be allowed to create databases). `WMS_BENCH_WMSCTL` measures another `wmsctl`
//! binary for the process-call figures, such as a build from before a change.

#[path = "suite/baseline.rs"]
mod baseline;
#[path = "suite/calls.rs"]
mod calls;
#[path = "suite/cleanup.rs"]
mod cleanup;
#[path = "suite/import.rs"]
mod import;
#[path = "suite/machine.rs"]
mod machine;
#[path = "suite/measure.rs"]
mod measure;
#[path = "suite/postgres.rs"]
mod postgres;
#[path = "suite/rate.rs"]
mod rate;
#[path = "suite/report.rs"]
mod report;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use idem_core::{Operator, Store, StoreOptions};
use tempfile::TempDir;

use crate::machine::Machine;
use crate::postgres::Server;
use crate::report::{Figure, Report, Skipped};

/// A `wmsctl` binary to measure instead of the one this build made.
const WMSCTL_VAR: &str = "WMS_BENCH_WMSCTL";
const GROUPS: [&str; 6] = ["calls", "rate", "clients", "import", "memory", "cleanup"];
const SQLITE3: &str = "/usr/bin/sqlite3";
/// The real `psql`: Debian's `/usr/bin/psql` is a Perl wrapper that adds ~20 ms to every call.
const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

impl Db {
    pub const BOTH: [Db; 2] = [Db::Sqlite, Db::Postgres];

    pub fn name(self) -> &'static str {
        match self {
            Db::Sqlite => "sqlite",
            Db::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How much each figure measures: the goals' sizes, or small ones for a smoke test.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Rounds of one product call and one client call each.
    pub call_rounds: usize,
    /// Rounds of one block of postings per side, and the postings in a block: short blocks, so
    /// that both sides see the same moments of a noisy machine.
    pub rate_rounds: usize,
    pub rate_block: usize,
    /// Rounds of one client and eight clients, each posting for `clients_window`.
    pub clients_rounds: usize,
    pub clients_window: Duration,
    pub import_lines: usize,
    pub import_rounds: usize,
    pub memory_lines: usize,
    pub cleanup_keys: usize,
    pub cleanup_rounds: usize,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            call_rounds: 30,
            rate_rounds: 40,
            rate_block: 25,
            clients_rounds: 8,
            clients_window: Duration::from_secs(1),
            import_lines: 100_000,
            import_rounds: 3,
            memory_lines: 1_000_000,
            cleanup_keys: 1_000_000,
            cleanup_rounds: 3,
        }
    }

    fn quick() -> Sizes {
        Sizes {
            call_rounds: 4,
            rate_rounds: 4,
            rate_block: 10,
            clients_rounds: 2,
            clients_window: Duration::from_millis(300),
            import_lines: 2_000,
            import_rounds: 1,
            memory_lines: 20_000,
            cleanup_keys: 20_000,
            cleanup_rounds: 1,
        }
    }
}

/// Everything a figure needs: the tools, a scratch directory, the PostgreSQL server, and the
/// figures measured so far.
#[derive(Debug)]
pub struct Bench {
    pub sizes: Sizes,
    pub wmsctl: PathBuf,
    pub sqlite3: PathBuf,
    pub psql: PathBuf,
    pub work: TempDir,
    pub pg: Server,
    pub figures: Vec<Figure>,
    pub skipped: Vec<Skipped>,
}

impl Bench {
    /// `wmsctl` on the database at `url`, as the operator `bench`, in an empty directory (no
    /// `.env`), with nothing from the caller's environment choosing another database.
    pub fn wmsctl(&self, url: &str) -> Command {
        let mut command = Command::new(&self.wmsctl);
        command
            .current_dir(self.work.path())
            .env_remove("WMS_DATABASE_URL")
            .env_remove("DATABASE_URL")
            .env_remove("WMS_LOG")
            .env("WMS_USER", baseline::USER)
            .arg("--database-url")
            .arg(url);
        command
    }

    /// The database's own client running `script` on the database at `url`.
    pub fn client(&self, db: Db, url: &str, script: &str) -> Command {
        baseline::client_command(db, &self.sqlite3, &self.psql, url, script)
    }

    /// A new, migrated database of the given kind; `name` is unique within the run.
    pub async fn fresh_database(&self, db: Db, name: &str) -> String {
        let name = format!("wms_bench_{name}").to_lowercase();
        let url = match db {
            Db::Sqlite => {
                let path = self.work.path().join(format!("{name}.db"));
                for suffix in ["", "-wal", "-shm"] {
                    std::fs::remove_file(format!("{}{suffix}", path.display())).ok();
                }
                format!("sqlite://{}", path.display())
            }
            Db::Postgres => self.pg.create_database(&name).await,
        };
        let store = Store::connect_for_migration(&url, &StoreOptions::default())
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
        store.migrate(&Operator::parse(baseline::USER).expect("a valid operator")).await.ok();
        store.close().await;
        url
    }

    /// Removes a database made by [`fresh_database`](Self::fresh_database).
    pub async fn drop_database(&self, db: Db, url: &str) {
        match db {
            Db::Sqlite => {
                for suffix in ["", "-wal", "-shm"] {
                    std::fs::remove_file(format!("{}{suffix}", baseline::sqlite_path(url))).ok();
                }
            }
            Db::Postgres => {
                let name = url.rsplit('/').next().unwrap_or_default();
                let name = name.split('?').next().unwrap_or_default();
                self.pg.drop_database(name).await;
            }
        }
    }

    pub fn skip(&mut self, id: impl Into<String>, reason: impl Into<String>) {
        let skipped = Skipped { id: id.into(), reason: reason.into() };
        eprintln!("bench: not measured: {}: {}", skipped.id, skipped.reason);
        self.skipped.push(skipped);
    }

    pub fn record(&mut self, figure: Figure) {
        let ratio = figure.ratio.map_or(String::new(), |r| format!(", ratio {r:.2}"));
        eprintln!("bench: {}: {:.2}{}", figure.id, figure.product.median, ratio);
        self.figures.push(figure);
    }
}

struct Options {
    quick: bool,
    groups: Vec<String>,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut quick = std::env::var("WMS_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut groups = Vec::new();
        // cargo passes `--bench` to every bench target; it means nothing here.
        for arg in std::env::args().skip(1).filter(|a| a != "--bench") {
            match arg.as_str() {
                "--quick" => quick = true,
                group if GROUPS.contains(&group) => groups.push(group.to_owned()),
                other => {
                    return Err(format!(
                        "unknown argument {other:?}; expected --quick or groups out of {}",
                        GROUPS.join(", ")
                    ));
                }
            }
        }
        if groups.is_empty() {
            groups = GROUPS.iter().map(|g| (*g).to_owned()).collect();
        }
        Ok(Options { quick, groups })
    }
}

fn main() -> ExitCode {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("bench: {message}");
            return ExitCode::from(2);
        }
    };
    for tool in [SQLITE3, PSQL] {
        if !Path::new(tool).exists() {
            eprintln!("bench: {tool} is missing; install sqlite3 and postgresql-client-15");
            return ExitCode::from(2);
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let built = PathBuf::from(env!("CARGO_BIN_EXE_wmsctl"));
    // target/release/wmsctl -> target/bench/results.json
    let results = built
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("results.json"), |t| t.join("bench/results.json"));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    let started = Instant::now();
    let machine = Machine::describe(SQLITE3, PSQL);
    let pg = Server::start(&workspace);
    let postgres = runtime.block_on(pg.version());
    eprintln!(
        "bench: {} mode; PostgreSQL {}",
        if options.quick { "quick" } else { "full" },
        if pg.owned() { "started for this run" } else { "from WMS_BENCH_PG_URL" }
    );
    // Another build can stand in for the one cargo built, to compare before and after a change.
    let wmsctl = std::env::var_os(WMSCTL_VAR).map_or(built, PathBuf::from);
    let mut bench = Bench {
        sizes: if options.quick { Sizes::quick() } else { Sizes::full() },
        wmsctl,
        sqlite3: PathBuf::from(SQLITE3),
        psql: PathBuf::from(PSQL),
        work: tempfile::Builder::new().prefix("wms-bench-").tempdir().expect("a scratch directory"),
        pg,
        figures: Vec::new(),
        skipped: Vec::new(),
    };

    runtime.block_on(async {
        for group in &options.groups {
            match group.as_str() {
                "calls" => calls::run(&mut bench).await,
                "rate" => rate::posting_rate(&mut bench).await,
                "clients" => rate::clients(&mut bench).await,
                "import" => import::run(&mut bench).await,
                "memory" => import::memory(&mut bench).await,
                "cleanup" => cleanup::run(&mut bench).await,
                _ => unreachable!("groups are checked when parsed"),
            }
        }
    });

    let report = Report {
        machine,
        postgres,
        quick: options.quick,
        seconds: started.elapsed().as_secs_f64(),
        figures: std::mem::take(&mut bench.figures),
        skipped: std::mem::take(&mut bench.skipped),
    };
    println!("{}", report.table());
    match report.write_json(&results) {
        Ok(()) => eprintln!("bench: figures written to {}", results.display()),
        Err(e) => eprintln!("bench: could not write {}: {e}", results.display()),
    }
    ExitCode::SUCCESS
}

//! Test support, behind the `test-support` feature: a fresh, migrated database of each kind for
//! every test, and [`both_databases!`](crate::both_databases) to run one test body on both, so
//! that "both backends behave identically" is checked rather than hoped for. SQLite needs
//! nothing; PostgreSQL needs an administrator URL in `WMS_TEST_PG_URL`, which `scripts/test`
//! provides by starting a throwaway server.
//!
//! ```text
//! idem_core::both_databases!(receipt_is_applied, |db| {
//!     let posted = db.store().post(&posting).await.unwrap();
//!     assert_eq!(posted.outcome, Outcome::Applied);
//! });
//! ```
//!
//! This expands to `mod receipt_is_applied { fn sqlite() .. fn postgres() .. }`, two tokio tests
//! that each check the stock against the ledger after the body. The calling crate needs `tokio`
//! with the `macros` and `rt-multi-thread` features.

use std::fmt;
use std::io::Write;

use sqlx::{Connection, PgConnection};
use tempfile::TempDir;
use uuid::Uuid;

use crate::key::Operator;
use crate::store::{Store, StoreOptions, redact_url};

/// The administrator URL of the PostgreSQL server that test databases are created on.
pub const PG_URL_VAR: &str = "WMS_TEST_PG_URL";

/// Set to `1` to make PostgreSQL tests fail instead of skipping when no server is configured,
/// so that a CI run cannot pass by silently testing only SQLite.
pub const REQUIRE_PG_VAR: &str = "WMS_REQUIRE_PG";

/// A fresh, migrated database that lives as long as this value, with a store connected to it.
pub struct TestDb {
    url: String,
    store: Store,
    // Declared last so that it outlives the store: the pool is dropped before its files or its
    // database go away.
    owner: Owner,
}

/// What keeps the database alive: both are only ever dropped.
enum Owner {
    Sqlite { _dir: TempDir },
    Postgres { _database: DatabaseGuard },
}

impl TestDb {
    /// A new SQLite file in its own temporary directory, removed when the `TestDb` is dropped.
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::Builder::new()
            .prefix("wms-test-")
            .tempdir()
            .expect("creating a temporary directory for a SQLite test database");
        let url = format!("sqlite://{}", dir.path().join("wms.db").display());
        let store = Store::connect(&url, &StoreOptions::default())
            .await
            .unwrap_or_else(|err| panic!("opening the SQLite test database {url}: {err}"));
        TestDb { url, store, owner: Owner::Sqlite { _dir: dir } }
    }

    /// A new database `wms_test_<uuid>` on the server named by `WMS_TEST_PG_URL`, migrated, and
    /// dropped again when the `TestDb` is dropped.
    ///
    /// Without that variable this returns `None` after a note on stderr, so that a developer
    /// without PostgreSQL can still run the SQLite half; with `WMS_REQUIRE_PG=1` it panics.
    pub async fn postgres() -> Option<TestDb> {
        let admin_url = match std::env::var(PG_URL_VAR) {
            Ok(url) if !url.is_empty() => url,
            _ if std::env::var(REQUIRE_PG_VAR).is_ok_and(|v| v == "1") => panic!(
                "{REQUIRE_PG_VAR}=1 but {PG_URL_VAR} is not set: PostgreSQL tests must run here; \
                 use scripts/test, which starts a throwaway server, or point {PG_URL_VAR} at one"
            ),
            _ => {
                // Written past the test harness's capture, which would otherwise hide the note
                // for every test that passes, and so hide that half the suite did not run.
                writeln!(std::io::stderr(), "skipping PostgreSQL test: {PG_URL_VAR} is not set")
                    .ok();
                return None;
            }
        };

        let name = format!("wms_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|err| {
            panic!("connecting to {PG_URL_VAR} ({}): {err}", redact_url(&admin_url))
        });
        // The name is ours (a prefix and hex digits), so it needs no quoting.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|err| panic!("creating test database {name}: {err}"));
        admin.close().await.ok();
        let guard = DatabaseGuard { admin_url: admin_url.clone(), name: name.clone() };

        let url = with_database(&admin_url, &name);
        let store = Store::connect_for_migration(&url, &StoreOptions::default())
            .await
            .unwrap_or_else(|err| panic!("connecting to test database {name}: {err}"));
        let actor = Operator::parse("test-support").expect("valid operator");
        store
            .migrate(&actor)
            .await
            .unwrap_or_else(|err| panic!("migrating test database {name}: {err}"));
        Some(TestDb { url, store, owner: Owner::Postgres { _database: guard } })
    }

    /// The database URL, as `wmsctl --database-url` takes it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A store connected to the database with the default options.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match &self.owner {
            Owner::Sqlite { .. } => "sqlite",
            Owner::Postgres { .. } => "postgres",
        };
        f.debug_struct("TestDb")
            .field("backend", &backend)
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

/// Panics unless every stock level equals the sum of its ledger rows.
pub async fn assert_stock_matches_ledger(store: &Store) {
    let differences = store.verify_stock().await.expect("verifying stock against the ledger");
    assert!(
        differences.is_empty(),
        "stock differs from the ledger on {}: {differences:#?}",
        store.backend_name()
    );
}

/// The number of ledger rows, counted by the database rather than read: cheap enough to poll
/// while another process writes.
pub async fn ledger_rows(store: &Store) -> u64 {
    const COUNT: &str = "SELECT COUNT(*) FROM ledger";
    let rows: i64 = match store {
        Store::Sqlite(sqlite) => sqlx::query_scalar(COUNT).fetch_one(sqlite.pool()).await,
        Store::Postgres(pg) => sqlx::query_scalar(COUNT).fetch_one(pg.pool()).await,
    }
    .expect("counting ledger rows");
    rows.try_into().expect("a count is not negative")
}

/// Drops a PostgreSQL test database, so that a long test run does not fill the disk with them.
struct DatabaseGuard {
    admin_url: String,
    name: String,
}

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop cannot await, and the test's own runtime may be single-threaded, so the statement
        // runs on a thread with a runtime of its own. Failure is ignored: the server is a
        // throwaway, and a leftover database harms nothing but disk space.
        let dropping = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await.ok()?;
                admin.close().await.ok()
            })
        });
        dropping.join().ok();
    }
}

/// The URL with its database name replaced, keeping any query parameters.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// Runs one async test body on SQLite and on PostgreSQL.
///
/// `both_databases!(name, |db| { ... })` defines `async fn name(db: &TestDb)` from the body and a
/// module `name` with two tests, `name::sqlite` and `name::postgres`. Each creates a fresh
/// [`TestDb`], runs the body, then checks that the stock still equals the ledger. The PostgreSQL
/// test returns early, passing, when [`TestDb::postgres`] skips. Attributes before the name (doc
/// comments, `#[ignore]`) go on both tests.
#[macro_export]
macro_rules! both_databases {
    ($(#[$attr:meta])* $name:ident, |$db:ident| $body:block $(,)?) => {
        async fn $name($db: &$crate::testing::TestDb) $body

        mod $name {
            $(#[$attr])*
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = $crate::testing::TestDb::sqlite().await;
                super::$name(&db).await;
                $crate::testing::assert_stock_matches_ledger(db.store()).await;
            }

            $(#[$attr])*
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) = $crate::testing::TestDb::postgres().await else {
                    return;
                };
                super::$name(&db).await;
                $crate::testing::assert_stock_matches_ledger(db.store()).await;
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn test_database_urls_keep_everything_but_the_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "wms_test_1"),
            "postgres://postgres@127.0.0.1:5432/wms_test_1"
        );
        assert_eq!(
            with_database("postgresql://u:p@db/admin?sslmode=disable", "t"),
            "postgresql://u:p@db/t?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@db:5433", "t"), "postgres://u@db:5433/t");
        assert_eq!(
            with_database("postgres://u@db?sslmode=require", "t"),
            "postgres://u@db/t?sslmode=require"
        );
    }
}

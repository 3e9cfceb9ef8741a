//! One process call, start to exit: `wmsctl receive` against the database's own client running
//! the same posting, and `wmsctl keys exists` against the client running the lookup. This is
//! what a script or a cron line feels.

use chrono::Utc;

use crate::baseline::{self, Receipt};
use crate::measure::{self, Samples, Side, sides};
use crate::report::{Check, Figure, Unit, Value};
use crate::{Bench, Db};

const SKU: &str = "SKU-CALL";
const LOCATION: &str = "DOCK-1";
const PROBE_KEY: &str = "probe-key";

pub async fn run(bench: &mut Bench) {
    for db in Db::BOTH {
        let url = bench.fresh_database(db, &format!("calls_{db}")).await;
        single_posting(bench, db, &url);
        key_exists(bench, db, &url);
        bench.drop_database(db, &url).await;
    }
}

fn client_name(db: Db) -> &'static str {
    match db {
        Db::Sqlite => "sqlite3",
        Db::Postgres => "psql",
    }
}

fn single_posting(bench: &mut Bench, db: Db, url: &str) {
    let mut product = Samples::default();
    let mut client = Samples::default();
    // Round 0 warms the page cache and the server and is not counted.
    for round in 0..=bench.sizes.call_rounds {
        for side in sides(round) {
            let key = format!("call-{round}-{side:?}");
            let run = match side {
                Side::Product => measure::run(
                    bench.wmsctl(url).args([
                        "receive",
                        "--key",
                        &key,
                        "--sku",
                        SKU,
                        "--qty",
                        "1",
                        "--location",
                        LOCATION,
                    ]),
                    0,
                ),
                Side::Baseline => {
                    let receipt = Receipt::new(&key, SKU, 1, LOCATION);
                    let script = match db {
                        Db::Sqlite => baseline::sqlite_posting_script(&receipt),
                        Db::Postgres => baseline::pg_posting_script(&receipt),
                    };
                    measure::run(&mut bench.client(db, url, &script), 0)
                }
            };
            if round > 0 {
                let ms = measure::millis(run.elapsed);
                match side {
                    Side::Product => product.push(ms),
                    Side::Baseline => client.push(ms),
                }
            }
        }
    }
    let figure = Figure::compare(
        format!("single_posting.{db}"),
        "single posting, one process call",
        Some(db.name()),
        Value::new("wmsctl receive", Unit::Millis, &product),
        Value::new(client_name(db), Unit::Millis, &client),
    )
    .check(|f| Check::ratio_at_most(f.ratio(), 1.5));
    bench.record(figure);
}

fn key_exists(bench: &mut Bench, db: Db, url: &str) {
    measure::run(
        bench.wmsctl(url).args([
            "receive",
            "--key",
            PROBE_KEY,
            "--sku",
            SKU,
            "--qty",
            "1",
            "--location",
            LOCATION,
        ]),
        0,
    );
    let mut product = Samples::default();
    let mut client = Samples::default();
    // What a wmsctl process costs before it touches a database, for the figure's note.
    let mut startup = Samples::default();
    for round in 0..=bench.sizes.call_rounds {
        let run = measure::run(bench.wmsctl(url).args(["keys", "generate"]), 0);
        if round > 0 {
            startup.push(measure::millis(run.elapsed));
        }
        for side in sides(round) {
            let run = match side {
                Side::Product => {
                    measure::run(bench.wmsctl(url).args(["keys", "exists", PROBE_KEY]), 0)
                }
                Side::Baseline => {
                    let script = baseline::exists_script(db, PROBE_KEY, Utc::now());
                    measure::run(&mut bench.client(db, url, &script), 0)
                }
            };
            if round > 0 {
                let ms = measure::millis(run.elapsed);
                match side {
                    Side::Product => product.push(ms),
                    Side::Baseline => client.push(ms),
                }
            }
        }
    }
    let figure = Figure::compare(
        format!("keys_exists.{db}"),
        "`keys exists`, one process call",
        Some(db.name()),
        Value::new("wmsctl keys exists", Unit::Millis, &product),
        Value::new(client_name(db), Unit::Millis, &client),
    )
    .check(|f| Check::ratio_at_most(f.ratio(), 1.3))
    .note(format!(
        "`wmsctl keys generate`, which opens no database, took {:.2} ms in the same rounds",
        startup.median()
    ));
    bench.record(figure);
}

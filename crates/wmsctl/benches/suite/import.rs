//! Batch import: `wmsctl import` of a day's receipts against the fastest hand-written chunked
//! SQL, the same import run again (every line a replay) against its first run, and the peak
//! memory of an import ten times as long.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::baseline::{self, Loop, Receipt};
use crate::measure::{self, Samples, Side, sides};
use crate::report::{Check, Figure, Unit, Value, thousands};
use crate::{Bench, Db};

/// Lines per transaction on the hand-written side.
const CHUNK: usize = 1_000;
/// How often the child's peak memory is read.
const WATCH: Duration = Duration::from_millis(20);

/// Writes `lines` receipts, each with its own key, spread over 5,000 SKUs and 40 locations.
fn write_file(dir: &Path, lines: usize) -> PathBuf {
    let path = dir.join(format!("receipts-{lines}.csv"));
    if path.exists() {
        return path;
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("creating a file"));
    writeln!(out, "key,kind,sku,qty,location,to_location,reference,reason").expect("writing");
    for i in 0..lines {
        writeln!(out, "imp-{i:07},receive,SKU-{:05},{},L-{:02},,,", i % 5_000, 1 + i % 9, i % 40)
            .expect("writing");
    }
    out.flush().expect("writing");
    path
}

/// Whether this build of `wmsctl` has the `import` command yet.
fn has_import(bench: &Bench) -> bool {
    Command::new(&bench.wmsctl)
        .args(["import", "--help"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn wmsctl_import(bench: &Bench, url: &str, file: &Path) -> measure::Run {
    measure::run_watched(bench.wmsctl(url).arg("import").arg(file), 0, Some(WATCH))
}

/// The hand-written import: read the file, post it in chunks of [`CHUNK`], one transaction each.
async fn handwritten_import(db: Db, url: &str, file: &Path) -> Duration {
    let started = Instant::now();
    let mut conn = Loop::connect(db, url).await;
    let text = std::fs::read_to_string(file).expect("reading the import file");
    let receipts: Vec<Receipt> = text
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            Receipt::new(fields[0], fields[2], fields[3].parse().expect("a quantity"), fields[4])
        })
        .collect();
    for chunk in receipts.chunks(CHUNK) {
        baseline::post_chunk(&mut conn, chunk).await;
    }
    conn.close().await;
    started.elapsed()
}

pub async fn run(bench: &mut Bench) {
    if !has_import(bench) {
        for db in Db::BOTH {
            bench.skip(format!("import.{db}"), "`wmsctl import` has not landed in this build");
        }
        return;
    }
    let lines = bench.sizes.import_lines;
    let file = write_file(bench.work.path(), lines);
    for db in Db::BOTH {
        let mut first = Samples::default();
        let mut rerun = Samples::default();
        let mut hand = Samples::default();
        for round in 0..bench.sizes.import_rounds {
            for side in sides(round) {
                let url = bench.fresh_database(db, &format!("import_{db}_{round}_{side:?}")).await;
                match side {
                    Side::Product => {
                        first.push(measure::millis(wmsctl_import(bench, &url, &file).elapsed));
                        rerun.push(measure::millis(wmsctl_import(bench, &url, &file).elapsed));
                    }
                    Side::Baseline => {
                        hand.push(measure::millis(handwritten_import(db, &url, &file).await));
                    }
                }
                bench.drop_database(db, &url).await;
            }
        }

        let rate =
            |ms: &Samples| Samples(ms.0.iter().map(|ms| lines as f64 / (ms / 1e3)).collect());
        let floor = match db {
            Db::Sqlite => 20_000.0,
            Db::Postgres => 12_000.0,
        };
        let figure = Figure::compare(
            format!("import.{db}"),
            format!("import of {} lines", thousands(lines as f64)),
            Some(db.name()),
            Value::new("wmsctl import", Unit::PerSecond, &rate(&first)),
            Value::new(
                format!("sqlx chunks of {}", thousands(CHUNK as f64)),
                Unit::PerSecond,
                &rate(&hand),
            ),
        )
        .check(|f| Check::ratio_at_least(f.ratio(), 0.8))
        .check(|f| Check::value_at_least(&f.product, floor));
        bench.record(figure);

        let figure = Figure::compare(
            format!("import_rerun.{db}"),
            "re-run of the same import (all replays)",
            Some(db.name()),
            Value::new("re-run", Unit::Millis, &rerun),
            Value::new("first run", Unit::Millis, &first),
        )
        .check(|f| Check::ratio_at_most(f.ratio(), 0.5));
        bench.record(figure);
    }
}

/// Peak resident memory of `wmsctl import` on SQLite, at the goal's size and at a tenth of it:
/// the two should be the same, since the file is read and posted a chunk at a time.
pub async fn memory(bench: &mut Bench) {
    if !has_import(bench) {
        bench.skip("import_memory.sqlite", "`wmsctl import` has not landed in this build");
        return;
    }
    let large = bench.sizes.memory_lines;
    let small = large / 10;
    let mut peaks = Vec::new();
    for lines in [small, large] {
        let file = write_file(bench.work.path(), lines);
        let url = bench.fresh_database(Db::Sqlite, &format!("memory_{lines}")).await;
        let run = wmsctl_import(bench, &url, &file);
        let peak = run.peak_rss.map_or(f64::NAN, |bytes| bytes as f64 / 1e6);
        peaks.push(peak);
        bench.drop_database(Db::Sqlite, &url).await;
    }
    let figure = Figure::compare(
        "import_memory.sqlite",
        format!("peak memory importing {} lines", thousands(large as f64)),
        Some(Db::Sqlite.name()),
        Value::single(format!("{} lines", thousands(large as f64)), Unit::Megabytes, peaks[1]),
        Value::single(format!("{} lines", thousands(small as f64)), Unit::Megabytes, peaks[0]),
    )
    .check(|f| Check::value_at_most(&f.product, 64.0))
    .check(|f| Check { goal: "flat (≤ 1.25×)".to_owned(), met: f.ratio() <= 1.25 })
    .note("VmHWM of the wmsctl process, read from /proc every 20 ms; one run of each size");
    bench.record(figure);
}

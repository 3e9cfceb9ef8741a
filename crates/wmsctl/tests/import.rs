//! `wmsctl import` end to end: the real binary on a fresh database of each kind, checking stdout,
//! stderr and the exit code together. Each line is its own posting; refused lines are named as
//! FILE:LINE and never take their neighbours down; malformed files are refused without a panic;
//! the reject file can be fixed and imported again; and an import killed with SIGKILL at any
//! moment and run again applies every line exactly once.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use idem_core::testing::TestDb;
use idem_core::{StockFilter, Store, TransactionFilter};
use serde_json::Value;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_wmsctl");
const HEADER: &str = "key,kind,sku,qty,location,to_location,reference,reason";

/// `wmsctl` on a test database as operator `importer`, in `dir`.
fn wmsctl(db: &TestDb, dir: &Path) -> Command {
    let mut cmd = bare(dir);
    cmd.args(["--database-url", db.url(), "--user", "importer"]);
    cmd
}

/// `wmsctl` in `dir` with nothing inherited that could change its behaviour.
fn bare(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    for var in
        ["WMS_DATABASE_URL", "DATABASE_URL", "WMS_USER", "WMS_KEY_TTL", "NO_COLOR", "WMS_LOG"]
    {
        cmd.env_remove(var);
    }
    cmd.current_dir(dir).stdin(Stdio::null()).arg("--no-dotenv");
    cmd
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command, args: &[&str]) -> Run {
    let Output { status, stdout, stderr } = cmd.args(args).output().expect("running wmsctl");
    Run {
        code: status.code().expect("wmsctl exited with a code"),
        stdout: String::from_utf8(stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(stderr).expect("stderr is UTF-8"),
    }
}

/// Writes `name` in a fresh directory and imports it with `args`.
fn import(db: &TestDb, name: &str, content: impl AsRef<[u8]>, args: &[&str]) -> (TempDir, Run) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join(name), content).expect("writing the import file");
    let out = run(&mut wmsctl(db, dir.path()), &[&["import", name], args].concat());
    (dir, out)
}

fn csv(lines: &[&str]) -> String {
    let mut text = format!("{HEADER}\n");
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    text
}

fn assert_exit(out: &Run, code: i32) {
    assert_eq!(out.code, code, "exit code\nstdout: {}\nstderr: {}", out.stdout, out.stderr);
}

fn assert_stderr(out: &Run, needle: &str) {
    assert!(out.stderr.contains(needle), "stderr lacks {needle:?}:\n{}", out.stderr);
}

/// The `-o jsonl` stream: one result object per line and nothing else.
fn results(out: &Run) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line:?}"));
            assert!(value["line"].is_u64() && value["outcome"].is_string(), "{value}");
            value
        })
        .collect()
}

fn outcomes(results: &[Value]) -> Vec<&str> {
    results.iter().map(|r| r["outcome"].as_str().unwrap()).collect()
}

async fn on_hand(store: &Store, sku: &str, location: &str) -> i64 {
    let filter = StockFilter { sku: Some(sku.to_owned()), location: Some(location.to_owned()) };
    store.stock(&filter).await.expect("reading stock").first().map_or(0, |l| l.on_hand)
}

async fn ledger_keys(store: &Store) -> Vec<String> {
    let ledger = store.transactions(&TransactionFilter::default()).await.expect("the ledger");
    ledger.into_iter().map(|t| t.key).collect()
}

/// (ledger rows, keys, stock rows): everything an import can write.
async fn footprint(store: &Store) -> (usize, usize, usize) {
    let ledger = ledger_keys(store).await.len();
    let keys = store.keys(&Default::default(), chrono::Utc::now()).await.unwrap().len();
    let stock = store.stock(&StockFilter::default()).await.unwrap().len();
    (ledger, keys, stock)
}

idem_core::both_databases!(same_key_twice_in_a_file_replays_then_conflicts, |db| {
    let file = csv(&[
        "po-1,receive,SKU-1,5,A1,,,",
        "po-1,receive,SKU-1,5,A1,,,",
        "po-1,receive,SKU-1,6,A1,,,",
        "po-2,receive,SKU-1,1,A1,,,",
    ]);

    let (_dir, out) = import(db, "orders.csv", file, &["-o", "jsonl"]);

    assert_exit(&out, 65);
    let results = results(&out);
    assert_eq!(outcomes(&results), ["applied", "replayed", "conflict", "applied"]);
    assert_eq!(
        results.iter().map(|r| r["line"].as_u64().unwrap()).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    let original = results[0]["transaction"]["id"].as_str().unwrap();
    assert_eq!(results[1]["transaction"]["id"], original, "the replay names the original");
    assert_eq!(results[2]["error"]["code"], "key_conflict");
    assert_stderr(
        &out,
        &format!(
            "wmsctl: orders.csv:4: key \"po-1\" was already used by transaction {original} for a \
             different request (fields that differ: qty)\n"
        ),
    );
    assert_stderr(
        &out,
        "orders.csv: read 4 lines: applied 2, replayed 1, conflicts 1, rejected 0, invalid 0",
    );
    assert_eq!(on_hand(db.store(), "SKU-1", "A1").await, 6);
});

idem_core::both_databases!(rejected_line_does_not_take_its_chunk_neighbours_down, |db| {
    let file = csv(&[
        "in-1,receive,SKU-1,5,A1,,,",
        "out-1,ship,SKU-1,10,A1,,,",
        "in-2,receive,SKU-1,3,A1,,,",
        "out-2,ship,SKU-1,8,A1,,,",
    ]);

    let (_dir, out) = import(db, "stock.csv", &file, &["--chunk-size", "500", "-o", "jsonl"]);

    assert_exit(&out, 65);
    assert_eq!(outcomes(&results(&out)), ["applied", "rejected", "applied", "applied"]);
    assert_stderr(
        &out,
        "wmsctl: stock.csv:3: insufficient stock: SKU-1 at A1 has 5 on hand, 10 requested\n",
    );
    assert_stderr(&out, "applied 3, replayed 0, conflicts 0, rejected 1, invalid 0");
    assert_eq!(on_hand(db.store(), "SKU-1", "A1").await, 0);
    assert_eq!(ledger_keys(db.store()).await.len(), 3);

    // Run again: the applied lines replay; the rejected one did not consume its key and is
    // refused again on its own merits.
    let (_dir, again) = import(db, "stock.csv", &file, &[]);
    assert_exit(&again, 65);
    assert_stderr(&again, "applied 0, replayed 3, conflicts 0, rejected 1, invalid 0");
    assert_eq!(ledger_keys(db.store()).await.len(), 3);
});

// Many small chunks, where shipments rely on receipts of the chunk before and invalid and
// refused lines sit in between: every line is reported once, in file order, with the outcome it
// would have had alone. (On PostgreSQL each chunk is read while the one before is written.)
idem_core::both_databases!(many_chunks_report_every_line_in_order_with_its_own_outcome, |db| {
    let mut lines = Vec::new();
    for i in 0..60 {
        lines.push(format!("r-{i},receive,SKU-9,2,A1,,,"));
        if i % 7 == 3 {
            lines.push(format!("bad-{i},receive,SKU-9,0,A1,,,"));
        }
        lines.push(format!("s-{i},ship,SKU-9,1,A1,,,"));
        if i % 11 == 5 {
            lines.push(format!("big-{i},ship,SKU-9,1000,A1,,,"));
        }
    }
    let file = csv(&lines.iter().map(String::as_str).collect::<Vec<_>>());

    let (_dir, out) = import(db, "many.csv", &file, &["--chunk-size", "4", "-o", "jsonl"]);

    assert_exit(&out, 65);
    let results = results(&out);
    let expected: Vec<&str> = lines
        .iter()
        .map(|line| match &line[..2] {
            "ba" => "invalid",
            "bi" => "rejected",
            _ => "applied",
        })
        .collect();
    assert_eq!(outcomes(&results), expected);
    let numbers: Vec<u64> = results.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (2..lines.len() as u64 + 2).collect::<Vec<_>>());
    assert_eq!(on_hand(db.store(), "SKU-9", "A1").await, 60);
    assert_eq!(ledger_keys(db.store()).await.len(), 120);
});

idem_core::both_databases!(clean_import_exits_zero_and_a_rerun_replays_every_line, |db| {
    let file = [
        r#"{"key":"j-1","kind":"receive","sku":"SKU-1","qty":7,"location":"A1","reference":"PO 'x' 東京"}"#,
        r#"{"key":"j-2","kind":"transfer","sku":"SKU-1","qty":2,"location":"A1","to_location":"B1"}"#,
        r#"{"key":"j-3","kind":"adjust","sku":"SKU-1","qty":-1,"location":"B1","reason":"count"}"#,
    ]
    .join("\n");

    let (_dir, out) = import(db, "moves.jsonl", &file, &["-o", "json"]);

    assert_exit(&out, 0);
    let summary: Value = serde_json::from_str(&out.stdout).expect("one JSON summary on stdout");
    assert_eq!(summary["read"], 3);
    assert_eq!(summary["applied"], 3);
    assert_eq!(summary["refused"], 0);
    assert_eq!(summary["format"], "jsonl");
    assert_eq!(summary["stopped_early"], false);
    assert!(summary["lines_per_second"].is_number());
    assert_eq!(on_hand(db.store(), "SKU-1", "A1").await, 5);
    assert_eq!(on_hand(db.store(), "SKU-1", "B1").await, 1);

    let (_dir, again) = import(db, "moves.jsonl", &file, &["-q"]);
    assert_exit(&again, 0);
    assert_eq!((again.stdout.as_str(), again.stderr.as_str()), ("", ""), "-q and plain: silent");
    let (_dir, again) = import(db, "moves.jsonl", &file, &[]);
    assert_stderr(&again, "moves.jsonl: read 3 lines: applied 0, replayed 3, conflicts 0");
    assert_eq!(on_hand(db.store(), "SKU-1", "B1").await, 1);
});

idem_core::both_databases!(bad_utf8_line_is_refused_alone, |db| {
    let mut file = csv(&["u-1,receive,SKU-1,1,A1,,,"]).into_bytes();
    file.extend_from_slice(b"u-2,receive,SKU-\xff,1,A1,,,\nu-3,receive,SKU-1,1,A1,,,\n");

    let (_dir, out) = import(db, "latin1.csv", file, &[]);

    assert_exit(&out, 65);
    assert_stderr(&out, "wmsctl: latin1.csv:3: the line is not valid UTF-8\n");
    assert_stderr(&out, "applied 2, replayed 0, conflicts 0, rejected 0, invalid 1");
    assert_eq!(ledger_keys(db.store()).await.len(), 2);
});

idem_core::both_databases!(quoted_line_breaks_count_as_physical_lines, |db| {
    let file = csv(&[
        "q-1,receive,SKU-1,1,A1,,\"first",
        "second\",",
        "q-2,receive,SKU-1,x,A1,,,",
        "q-3,receive,SKU-1,\"1\",A1,,\"a, \"\"quoted\"\" one\",",
        "\"q-4\",receive,SKU-1,1,A1,,\"open",
    ]);

    let (_dir, out) = import(db, "quotes.csv", file, &["-o", "jsonl"]);

    assert_exit(&out, 65);
    assert_stderr(
        &out,
        "quotes.csv:2: invalid reference: must not contain control or text-direction characters, found \\u{a}",
    );
    assert_stderr(&out, "quotes.csv:4: invalid qty: \"x\" is not a whole number\n");
    assert_stderr(&out, "quotes.csv:6: a quoted field is never closed");
    let results = results(&out);
    assert_eq!(outcomes(&results), ["invalid", "invalid", "applied", "invalid"]);
    assert_eq!(results[2]["line"], 5);
    assert_eq!(results[2]["transaction"]["reference"], "a, \"quoted\" one");
});

idem_core::both_databases!(crlf_endings_and_a_bom_read_like_plain_lines, |db| {
    let file = format!(
        "\u{feff}{}",
        csv(&["c-1,receive,SKU-1,4,A1,,,", "c-2,adjust,SKU-1,-1,A1,,,recount"])
            .replace('\n', "\r\n")
    );

    let (_dir, out) = import(db, "windows.csv", file, &["-o", "jsonl"]);

    assert_exit(&out, 0);
    let results = results(&out);
    assert_eq!(results[0]["key"], "c-1");
    assert_eq!(results[1]["transaction"]["reason"], "recount", "no CR left on the last cell");
    assert_eq!(on_hand(db.store(), "SKU-1", "A1").await, 3);
});

idem_core::both_databases!(empty_file_is_refused_with_65_and_a_header_alone_is_fine, |db| {
    let (_dir, out) = import(db, "empty.csv", "", &[]);
    assert_exit(&out, 65);
    assert_eq!(out.stdout, "");
    assert_stderr(&out, "wmsctl: empty.csv: the input is empty: expected a CSV header row");

    let (_dir, out) = import(db, "blank.jsonl", "\n\n", &[]);
    assert_exit(&out, 65);
    assert_stderr(&out, "blank.jsonl: the input is empty");

    let (_dir, out) = import(db, "header.csv", format!("{HEADER}\n"), &[]);
    assert_exit(&out, 0);
    assert_stderr(&out, "header.csv: read 0 lines");
    assert_eq!(footprint(db.store()).await, (0, 0, 0));
});

idem_core::both_databases!(ten_megabyte_line_is_refused_alone, |db| {
    let mut file = csv(&["big-1,receive,SKU-1,1,A1,,,"]);
    file.push_str(&format!("big-2,receive,SKU-1,1,A1,,{},\n", "r".repeat(10 << 20)));
    file.push_str("big-3,receive,SKU-1,1,A1,,,\n");

    let (_dir, out) = import(db, "huge.csv", file, &["--reject-file", "rejects.csv"]);

    assert_exit(&out, 65);
    assert_stderr(&out, "wmsctl: huge.csv:3: the line is longer than the limit of 1 MiB\n");
    assert_stderr(&out, "applied 2, replayed 0, conflicts 0, rejected 0, invalid 1");
    assert_eq!(ledger_keys(db.store()).await.len(), 2);
});

idem_core::both_databases!(json_lines_of_the_wrong_shape_are_refused_alone, |db| {
    let file = [
        r#"{"key":"w-1","kind":"receive","sku":"SKU-1","qty":1,"location":"A1"}"#,
        "[1, 2]",
        r#""just text""#,
        r#"{"key":"w-3","kind":"receive","sku":"SKU-1","qty":"5","location":"A1"}"#,
        r#"{"key":5,"kind":"receive","sku":"SKU-1","qty":5,"location":"A1"}"#,
        r#"{"key":"w-5","kind":"receive","sku":"SKU-1","qty":5,"location":"A1","colour":"red"}"#,
        "{not json",
        r#"{"key":"w-7","kind":"receive","sku":"SKU-1","qty":2.5,"location":"A1"}"#,
        r#"{"key":"w-8","kind":"receive","sku":"SKU-1","qty":1,"location":"A1","reference":null}"#,
    ]
    .join("\n");

    let (_dir, out) = import(db, "shapes.ndjson", file, &[]);

    assert_exit(&out, 65);
    for needle in [
        "shapes.ndjson:2: expected a JSON object, found an array\n",
        "shapes.ndjson:3: expected a JSON object, found a string\n",
        "shapes.ndjson:4: invalid qty: must be a number, found a string\n",
        "shapes.ndjson:5: invalid key: must be a string, found a number\n",
        "shapes.ndjson:6: unknown field \"colour\"",
        "shapes.ndjson:7: not valid JSON: key must be a string at column 2\n",
        "shapes.ndjson:8: invalid qty: 2.5 is not a whole number",
        "applied 2, replayed 0, conflicts 0, rejected 0, invalid 7",
    ] {
        assert_stderr(&out, needle);
    }
});

idem_core::both_databases!(bad_header_stops_the_file_before_anything_is_posted, |db| {
    let (_dir, out) =
        import(db, "colour.csv", "key,kind,sku,qty,location,colour\nk,receive,S,1,A,red\n", &[]);
    assert_exit(&out, 65);
    assert_stderr(
        &out,
        "wmsctl: colour.csv:1: unknown column \"colour\" in the header; the columns are key, kind, sku, qty, location, to_location, reference, reason\n",
    );

    let (_dir, out) = import(db, "noqty.csv", "key,kind,sku,location\nk,receive,S,A\n", &[]);
    assert_exit(&out, 65);
    assert_stderr(&out, "wmsctl: noqty.csv:1: the header lacks the required column(s) qty");

    let (_dir, out) = import(db, "twice.csv", "key,kind,sku,qty,location,Key\n", &["-o", "json"]);
    assert_exit(&out, 65);
    assert_eq!(out.stdout, "");
    let error: Value = serde_json::from_str(out.stderr.trim()).expect("a JSON error on stderr");
    assert_eq!(error["error"]["code"], "invalid_input");
    assert_eq!(footprint(db.store()).await, (0, 0, 0));
});

idem_core::both_databases!(csv_rows_of_the_wrong_shape_are_refused_alone, |db| {
    let file = csv(&[
        "s-1,receive,SKU-1,1,A1",
        ",,,,,,,",
        "s-2,receive,SKU-1,1,A1,,,,extra",
        "s-3,receive,SKU-1,1,A1,,,",
    ]);

    let (_dir, out) = import(db, "shape.csv", file, &[]);

    assert_exit(&out, 65);
    assert_stderr(&out, "shape.csv:2: expected 8 fields as in the header, found 5\n");
    assert_stderr(&out, "shape.csv:4: expected 8 fields as in the header, found 9\n");
    assert_stderr(&out, "read 3 lines: applied 1");
});

idem_core::both_databases!(missing_or_unreadable_input_exits_66, |db| {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&mut wmsctl(db, dir.path()), &["import", "nowhere.csv"]);
    assert_exit(&out, 66);
    assert_stderr(&out, "wmsctl: cannot open nowhere.csv: No such file or directory");

    std::fs::create_dir(dir.path().join("folder.csv")).unwrap();
    let out = run(&mut wmsctl(db, dir.path()), &["import", "folder.csv"]);
    assert_exit(&out, 66);
    assert_stderr(&out, "wmsctl: cannot read folder.csv: Is a directory");
    assert_eq!(out.stdout, "");
});

idem_core::both_databases!(stdin_is_read_from_dash_and_its_format_sniffed, |db| {
    let dir = tempfile::tempdir().unwrap();
    let mut child = wmsctl(db, dir.path())
        .args(["import", "-", "-o", "jsonl"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = "\n{\"key\":\"in-1\",\"kind\":\"receive\",\"sku\":\"S\",\"qty\":1,\"location\":\"A\"}\n{}\n";
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let out = Run {
        code: output.status.code().unwrap(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    };

    assert_exit(&out, 65);
    assert_eq!(outcomes(&results(&out)), ["applied", "invalid"]);
    assert_stderr(&out, "wmsctl: <stdin>:3: missing key\n");
});

idem_core::both_databases!(reject_file_round_trip_csv, |db| {
    let dir = tempfile::tempdir().unwrap();
    let file = csv(&[
        "r-1,receive,SKU-1,5,A1,,PO-1,",
        "r-2,ship,SKU-2,10,A1,,\"PO, 2\",",
        "r-3,receive,SKU-1,ten,A1,,,",
        "r-1,receive,SKU-1,6,A1,,PO-1,",
    ]);
    std::fs::write(dir.path().join("in.csv"), file).unwrap();

    let out =
        run(&mut wmsctl(db, dir.path()), &["import", "in.csv", "--reject-file", "rejects.csv"]);

    assert_exit(&out, 65);
    assert_stderr(&out, "wmsctl: 3 refused lines written to rejects.csv\n");
    let rejects = std::fs::read_to_string(dir.path().join("rejects.csv")).unwrap();
    let rows: Vec<&str> = rejects.lines().collect();
    assert_eq!(rows[0], format!("{HEADER},error"));
    assert_eq!(
        rows[1],
        "r-2,ship,SKU-2,10,A1,,\"PO, 2\",,\"line 3: insufficient stock: SKU-2 at A1 has 0 on hand, 10 requested\""
    );
    assert!(rows[2].starts_with("r-3,receive,SKU-1,ten,A1,,,,\"line 4: invalid qty"), "{rejects}");
    assert!(
        rows[3].starts_with(
            "r-1,receive,SKU-1,6,A1,,PO-1,,\"line 5: key \"\"r-1\"\" was already used"
        ),
        "{rejects}"
    );
    assert_eq!(rows.len(), 4);

    // The operator receives the missing stock, fixes the two bad lines and imports the reject
    // file as it is, error column and all.
    let receive =
        ["receive", "--key", "fix-stock", "--sku", "SKU-2", "--qty", "10", "--location", "A1"];
    assert_exit(&run(&mut wmsctl(db, dir.path()), &receive), 0);
    let fixed =
        rejects.replace(",ten,", ",10,").replace("r-1,receive,SKU-1,6", "r-4,receive,SKU-1,6");
    std::fs::write(dir.path().join("rejects.csv"), fixed).unwrap();
    let again = ["import", "rejects.csv", "--reject-file", "rejects-2.csv"];
    let out = run(&mut wmsctl(db, dir.path()), &again);

    assert_exit(&out, 0);
    assert_stderr(
        &out,
        "rejects.csv: read 3 lines: applied 3, replayed 0, conflicts 0, rejected 0, invalid 0",
    );
    let second = std::fs::read_to_string(dir.path().join("rejects-2.csv")).unwrap();
    assert_eq!(second, format!("{HEADER},error\n"), "nothing refused the second time");
    assert_eq!(on_hand(db.store(), "SKU-1", "A1").await, 21);
    assert_eq!(on_hand(db.store(), "SKU-2", "A1").await, 0);
});

idem_core::both_databases!(reject_file_round_trip_jsonl, |db| {
    let dir = tempfile::tempdir().unwrap();
    let file = [
        r#"{"key":"x-1","kind":"ship","sku":"SKU-1","qty":4,"location":"A1","reference":"PO 9"}"#,
        r#"{"key":"x-2","kind":"receive","sku":"SKU-1","qty":"4","location":"A1"}"#,
        "[]",
    ]
    .join("\n");
    std::fs::write(dir.path().join("in.jsonl"), file).unwrap();

    let out =
        run(&mut wmsctl(db, dir.path()), &["import", "in.jsonl", "--reject-file", "rejects.jsonl"]);

    assert_exit(&out, 65);
    let rejects = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap();
    let mut rows: Vec<Value> = rejects.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["reference"], "PO 9");
    assert!(rows[0]["error"].as_str().unwrap().starts_with("line 1: insufficient stock"));
    assert!(rows[1]["error"].as_str().unwrap().starts_with("line 2: invalid qty"));
    assert_eq!(rows[2]["input"], "[]", "a line that is no object is kept as text");

    // Fix: the shipment is moved after a receipt, the quantity becomes a number, the junk goes.
    rows[1]["qty"] = 4.into();
    let fixed = [&rows[1], &rows[0]].map(|row| row.to_string()).join("\n");
    std::fs::write(dir.path().join("rejects.jsonl"), fixed).unwrap();
    let out = run(&mut wmsctl(db, dir.path()), &["import", "rejects.jsonl"]);

    assert_exit(&out, 0);
    assert_stderr(&out, "applied 2, replayed 0");
    assert_eq!(on_hand(db.store(), "SKU-1", "A1").await, 0);
});

idem_core::both_databases!(reject_file_that_cannot_be_created_exits_73_before_posting, |db| {
    let file = csv(&["n-1,receive,SKU-1,1,A1,,,", "n-2,ship,SKU-1,5,A1,,,"]);

    let (dir, out) = import(db, "in.csv", &file, &["--reject-file", "no/such/dir/rejects.csv"]);

    assert_exit(&out, 73);
    assert_stderr(
        &out,
        "wmsctl: cannot create the reject file no/such/dir/rejects.csv: No such file or directory",
    );
    assert_eq!(footprint(db.store()).await, (0, 0, 0), "nothing was posted");

    let out = run(&mut wmsctl(db, dir.path()), &["import", "in.csv", "--reject-file", "./in.csv"]);
    assert_exit(&out, 73);
    assert_stderr(&out, "the reject file ./in.csv is the input file");
    assert_eq!(std::fs::read_to_string(dir.path().join("in.csv")).unwrap(), file, "input intact");
});

idem_core::both_databases!(dry_run_validates_and_writes_nothing, |db| {
    let file = csv(&[
        "d-1,receive,SKU-1,5,A1,,,",
        "d-2,ship,SKU-1,50,A1,,,",
        "d-3,transfer,SKU-1,1,A1,A1,,",
        "d-4,receive,SKU-1,2,A1,,,",
    ]);

    let (dir, out) = import(db, "plan.csv", &file, &["--dry-run", "-o", "json"]);

    assert_exit(&out, 65);
    let summary: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(summary["dry_run"], true);
    assert_eq!((summary["valid"].as_u64(), summary["invalid"].as_u64()), (Some(3), Some(1)));
    assert_eq!(summary["valid_by_kind"], serde_json::json!({"receive": 2, "ship": 1}));
    assert_eq!(summary["applied"], 0);
    assert_stderr(&out, "plan.csv:4: invalid to_location: must differ from the source location\n");
    assert_stderr(
        &out,
        "plan.csv: dry run, nothing written: read 4 lines: 3 would be posted (receive 2, ship 1), invalid 1",
    );
    assert_eq!(footprint(db.store()).await, (0, 0, 0));

    // A dry run does not even open the database: a SQLite file it names is not created.
    let never = dir.path().join("never.db");
    let url = format!("sqlite://{}", never.display());
    let args = ["import", "plan.csv", "--dry-run", "--user", "importer", "--database-url", &url];
    let out = run(&mut bare(dir.path()), &args);
    assert_exit(&out, 65);
    assert!(!never.exists(), "the dry run created {}", never.display());
});

idem_core::both_databases!(max_errors_stops_early_and_keeps_what_was_committed, |db| {
    let file = csv(&[
        "m-1,receive,SKU-1,1,A1,,,",
        "m-2,receive,SKU-1,0,A1,,,",
        "m-3,receive,SKU-1,1,A1,,,",
        "m-4,ship,SKU-1,99,A1,,,",
        "m-5,receive,SKU-1,1,A1,,,",
        "m-6,receive,SKU-1,0,A1,,,",
        "m-7,receive,SKU-1,1,A1,,,",
    ]);

    let (dir, out) =
        import(db, "errors.csv", &file, &["--max-errors", "2", "--chunk-size", "2", "-o", "json"]);

    assert_exit(&out, 65);
    let summary: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(summary["stopped_early"], true);
    assert_eq!((summary["read"].as_u64(), summary["refused"].as_u64()), (Some(4), Some(2)));
    assert_eq!(summary["last_line"], 5);
    assert_stderr(
        &out,
        "stopped early after 2 refused lines (--max-errors 2); lines after line 5 were not processed",
    );
    assert_eq!(ledger_keys(db.store()).await.len(), 2, "m-1 and m-3 stay committed");

    // A limit reached on the very last line is not stopping early.
    let out = run(
        &mut wmsctl(db, dir.path()),
        &["import", "errors.csv", "--max-errors", "3", "-o", "json"],
    );
    let summary: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (summary["read"].as_u64(), summary["stopped_early"].as_bool()),
        (Some(7), Some(false))
    );
    assert_eq!(summary["replayed"], 2);
});

idem_core::both_databases!(temporary_database_failure_exits_75_and_a_rerun_is_safe, |db| {
    let file = csv(&[
        "t-1,receive,SKU-1,1,A1,,,",
        "t-2,receive,SKU-1,1,A1,,,",
        "t-3,receive,SKU-1,1,A1,,,",
        "t-4,receive,CUT,1,A1,,,",
    ]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.csv"), &file).unwrap();
    let args = ["import", "in.csv", "--chunk-size", "2", "--busy-timeout", "1s"];

    let out = match db.store() {
        // Another writer holds the SQLite lock for longer than the import waits.
        Store::Sqlite(sqlite) => {
            let url = format!("sqlite://{}", sqlite.path().display());
            let mut other =
                <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.unwrap();
            sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut other).await.unwrap();
            let out = run(&mut wmsctl(db, dir.path()), &args);
            sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
            assert_stderr(&out, "database is busy");
            out
        }
        // The server ends the session in the middle of the second chunk, as a restart would.
        Store::Postgres(pg) => {
            sqlx::raw_sql(
                "CREATE FUNCTION cut() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.sku = 'CUT' THEN PERFORM pg_terminate_backend(pg_backend_pid()); \
                 PERFORM pg_sleep(5); END IF; RETURN NEW; END $$; \
                 CREATE TRIGGER cut BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION cut()",
            )
            .execute(pg.pool())
            .await
            .unwrap();
            let out = run(&mut wmsctl(db, dir.path()), &args);
            sqlx::raw_sql("DROP TRIGGER cut ON ledger").execute(pg.pool()).await.unwrap();
            assert_stderr(&out, "in.csv: the import stopped at lines 4-5");
            assert_stderr(&out, "read 2 lines: applied 2");
            assert_eq!(ledger_keys(db.store()).await.len(), 2, "the first chunk stays committed");
            out
        }
    };

    assert_exit(&out, 75);
    assert_eq!(out.stdout, "");
    assert_stderr(&out, "re-running the import is safe: lines already committed will replay");

    let out = run(&mut wmsctl(db, dir.path()), &args);
    assert_exit(&out, 0);
    assert_eq!(ledger_keys(db.store()).await.len(), 4);
});

/// A seed that differs between runs, printed so that a failure can be read back.
fn random(n: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(n)
}

idem_core::both_databases!(
    import_killed_at_random_moments_then_rerun_applies_every_line_once,
    |db| {
        use std::os::unix::process::ExitStatusExt;

        const LINES: u64 = 10_000;
        let dir = tempfile::tempdir().unwrap();
        let mut file = format!("{HEADER}\n");
        for i in 0..LINES {
            // Groups of four that need no stock from outside the group, so that every line applies
            // whatever the order in which chunks were committed before a kill.
            let sku = format!("SKU-{}", (i / 4) % 50);
            file.push_str(&match i % 4 {
                0 => format!("kill-{i},receive,{sku},10,A1,,,\n"),
                1 => format!("kill-{i},transfer,{sku},5,A1,B1,,\n"),
                2 => format!("kill-{i},ship,{sku},3,B1,,,\n"),
                _ => format!("kill-{i},adjust,{sku},1,A1,,,count\n"),
            });
        }
        std::fs::write(dir.path().join("big.csv"), file).unwrap();

        // Each round waits until the import has committed past a random point in the lines it
        // has still to apply, at most half-way, then kills it after a random pause of up to about
        // a chunk's time, so that kills land both between chunks and inside one.
        let mut killed_mid_import = 0;
        for round in 0..4 {
            let before = idem_core::testing::ledger_rows(db.store()).await;
            if before == LINES {
                break;
            }
            let target = before + 1 + random(round) % ((LINES - before) / 2).max(1);
            let pause = Duration::from_millis(random(round + 100) % 40);
            let mut child = wmsctl(db, dir.path())
                .args(["import", "big.csv", "-q"])
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let started = std::time::Instant::now();
            while child.try_wait().unwrap().is_none()
                && idem_core::testing::ledger_rows(db.store()).await < target
            {
                assert!(started.elapsed() < Duration::from_secs(20), "the import made no progress");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(pause).await;
            if child.try_wait().unwrap().is_none() {
                child.kill().expect("SIGKILL");
            }
            let status = child.wait().unwrap();
            let after = idem_core::testing::ledger_rows(db.store()).await;
            let backend = db.store().backend_name();
            // An import can finish between the look and the kill; it then exited on its own.
            let killed = status.signal() == Some(9);
            eprintln!(
                "{backend} {round}: {before}..{after} rows, killed: {killed} ({target}+{pause:?})"
            );
            assert!(killed || status.code() == Some(0), "killed or finished: {status:?}");
            if killed && 0 < after && after < LINES {
                killed_mid_import += 1;
            }

            // Whatever the moment of the kill, what was committed is whole: the stock equals
            // the ledger and no line was applied twice.
            let verify = run(&mut wmsctl(db, dir.path()), &["stock", "--verify"]);
            assert_exit(&verify, 0);
            idem_core::testing::assert_stock_matches_ledger(db.store()).await;
            let keys = ledger_keys(db.store()).await;
            assert!(keys.len() as u64 >= after, "the ledger lost rows it was counted with");
            assert_eq!(keys.iter().collect::<HashSet<_>>().len(), keys.len(), "each key once");
        }
        assert!(killed_mid_import > 0, "no round was killed with part of the file committed");

        let mut last = None;
        for _ in 0..3 {
            let out = run(&mut wmsctl(db, dir.path()), &["import", "big.csv", "-o", "json"]);
            if out.code == 0 {
                last = Some(out);
                break;
            }
            eprintln!("re-run exited {}: {}", out.code, out.stderr);
        }
        let out = last.expect("a re-run exits 0");
        let summary: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(summary["read"], 10_000);
        assert_eq!(summary["refused"], 0);
        let keys = ledger_keys(db.store()).await;
        assert_eq!(keys.len(), 10_000, "one ledger row per line");
        assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 10_000, "each key once");
        let verify = run(&mut wmsctl(db, dir.path()), &["stock", "--verify"]);
        assert_exit(&verify, 0);
        assert_eq!(on_hand(db.store(), "SKU-0", "A1").await, 50 * 6);
    }
);

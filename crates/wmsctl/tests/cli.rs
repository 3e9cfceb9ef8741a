//! The command line end to end: the real `wmsctl` binary against a fresh database of each kind,
//! checking stdout, stderr and the exit code together.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use idem_core::testing::TestDb;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wmsctl");

/// `wmsctl` on a test database as operator `alice`, with nothing inherited that could change
/// its behaviour.
fn wmsctl(db: &TestDb) -> Command {
    let mut cmd = bare();
    cmd.args(["--database-url", db.url(), "--user", "alice"]);
    cmd
}

fn bare() -> Command {
    let mut cmd = Command::new(BIN);
    for var in
        ["WMS_DATABASE_URL", "DATABASE_URL", "WMS_USER", "WMS_KEY_TTL", "NO_COLOR", "WMS_LOG"]
    {
        cmd.env_remove(var);
    }
    cmd.arg("--no-dotenv").stdin(Stdio::null());
    cmd
}

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

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}): {:?}\nstderr: {}", run.stdout, run.stderr)
    })
}

fn on_hand(db: &TestDb, sku: &str, location: &str) -> i64 {
    let out = run(&mut wmsctl(db), &["stock", "--sku", sku, "--location", location, "-o", "json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    json(&out).as_array().unwrap().first().map_or(0, |l| l["on_hand"].as_i64().unwrap())
}

/// Everything a failed command could have written.
async fn snapshot(db: &TestDb) -> (usize, usize, usize) {
    let store = db.store();
    let stock = store.stock(&Default::default()).await.unwrap().len();
    let ledger = store.transactions(&Default::default()).await.unwrap().len();
    let keys = store.keys(&Default::default(), chrono::Utc::now()).await.unwrap().len();
    (stock, ledger, keys)
}

idem_core::both_databases!(receipt_then_retry_is_replayed, |db| {
    let args = [
        "receive",
        "--key",
        "r-1",
        "--sku",
        "SKU-1",
        "--qty",
        "5",
        "--location",
        "A1",
        "-o",
        "json",
    ];
    let first = run(&mut wmsctl(db), &args);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let first_json = json(&first);
    assert_eq!(first_json["outcome"], "applied");
    assert_eq!(first_json["key"], "r-1");
    assert_eq!(first_json["user"], "alice");
    assert_eq!(first_json["transaction"]["qty"], 5);
    assert!(first.stderr.is_empty(), "an applied posting prints no note: {}", first.stderr);

    let retry = run(&mut wmsctl(db), &args);
    assert_eq!(retry.code, 0, "{}", retry.stderr);
    let retry_json = json(&retry);
    assert_eq!(retry_json["outcome"], "replayed");
    assert_eq!(retry_json["transaction"]["id"], first_json["transaction"]["id"]);
    assert!(retry.stderr.contains("wmsctl: replayed: key r-1"), "{}", retry.stderr);
    assert_eq!(on_hand(db, "SKU-1", "A1"), 5);

    let shown = run(&mut wmsctl(db), &["keys", "show", "r-1", "-o", "json"]);
    assert_eq!(shown.code, 0);
    let shown = json(&shown);
    assert_eq!(shown["state"], "live");
    assert_eq!(shown["replay_count"], 1);
    assert_eq!(shown["transaction_id"], first_json["transaction"]["id"]);
    assert_eq!(shown["request"]["sku"], "SKU-1");
});

idem_core::both_databases!(conflicting_reuse_exits_3_and_names_the_fields, |db| {
    let base = ["receive", "--key", "c-1", "--sku", "SKU-1", "--location", "A1"];
    assert_eq!(run(&mut wmsctl(db), &[&base[..], &["--qty", "5"]].concat()).code, 0);

    let conflict =
        run(&mut wmsctl(db), &[&base[..], &["--qty", "6", "--reference", "PO-9"]].concat());
    assert_eq!(conflict.code, 3);
    assert!(conflict.stdout.is_empty());
    assert!(
        conflict.stderr.starts_with("wmsctl: key \"c-1\" was already used by transaction"),
        "{}",
        conflict.stderr
    );
    assert!(conflict.stderr.contains("fields that differ: qty, reference"), "{}", conflict.stderr);

    let as_json = run(&mut wmsctl(db), &[&base[..], &["--qty", "6", "-o", "json"]].concat());
    assert_eq!(as_json.code, 3);
    assert!(as_json.stdout.is_empty());
    let err: Value = serde_json::from_str(as_json.stderr.trim()).expect("JSON error on stderr");
    assert_eq!(err["error"]["code"], "key_conflict");
    assert_eq!(on_hand(db, "SKU-1", "A1"), 5);
});

idem_core::both_databases!(strict_mode_refuses_duplicates_with_exit_4, |db| {
    let args = [
        "receive",
        "--key",
        "s-1",
        "--sku",
        "S",
        "--qty",
        "2",
        "--location",
        "A",
        "--on-duplicate",
        "fail",
    ];
    assert_eq!(run(&mut wmsctl(db), &args).code, 0);
    let again = run(&mut wmsctl(db), &args);
    assert_eq!(again.code, 4);
    assert!(again.stdout.is_empty());
    assert!(again.stderr.contains("duplicate refused"), "{}", again.stderr);
    assert_eq!(on_hand(db, "S", "A"), 2);
});

idem_core::both_databases!(short_shipment_exits_65_and_keeps_the_key_free, |db| {
    let ship = ["ship", "--key", "sh-1", "--sku", "S", "--qty", "3", "--location", "A"];
    let refused = run(&mut wmsctl(db), &ship);
    assert_eq!(refused.code, 65);
    assert!(refused.stdout.is_empty());
    assert_eq!(refused.stderr, "wmsctl: insufficient stock: S at A has 0 on hand, 3 requested\n");
    assert_eq!(run(&mut wmsctl(db), &["keys", "exists", "sh-1"]).code, 1, "key not consumed");

    assert_eq!(
        run(
            &mut wmsctl(db),
            &["receive", "--key", "in-1", "--sku", "S", "--qty", "10", "--location", "A"]
        )
        .code,
        0
    );
    let retried = run(&mut wmsctl(db), &[&ship[..], &["-o", "json"]].concat());
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    assert_eq!(json(&retried)["outcome"], "applied");
    assert_eq!(on_hand(db, "S", "A"), 7);
});

idem_core::both_databases!(transfer_and_adjust_move_stock_and_verify_holds, |db| {
    assert_eq!(
        run(
            &mut wmsctl(db),
            &["receive", "--key", "t-0", "--sku", "S", "--qty", "10", "--location", "A"]
        )
        .code,
        0
    );
    let moved = run(
        &mut wmsctl(db),
        &[
            "transfer", "--key", "t-1", "--sku", "S", "--qty", "4", "--from", "A", "--to", "B",
            "-o", "json",
        ],
    );
    assert_eq!(moved.code, 0, "{}", moved.stderr);
    assert_eq!(json(&moved)["transaction"]["to_location"], "B");
    let too_much = run(
        &mut wmsctl(db),
        &["transfer", "--key", "t-2", "--sku", "S", "--qty", "7", "--from", "A", "--to", "B"],
    );
    assert_eq!(too_much.code, 65);
    let counted = run(
        &mut wmsctl(db),
        &[
            "adjust",
            "--key",
            "t-3",
            "--sku",
            "S",
            "--delta",
            "-2",
            "--location",
            "B",
            "--reason",
            "cycle count",
        ],
    );
    assert_eq!(counted.code, 0, "{}", counted.stderr);
    let plus = run(
        &mut wmsctl(db),
        &[
            "adjust",
            "--key",
            "t-4",
            "--sku",
            "S",
            "--delta",
            "+1",
            "--location",
            "A",
            "--reason",
            "found one",
        ],
    );
    assert_eq!(plus.code, 0, "{}", plus.stderr);
    assert_eq!((on_hand(db, "S", "A"), on_hand(db, "S", "B")), (7, 2));

    let verify = run(&mut wmsctl(db), &["stock", "--verify"]);
    assert_eq!(verify.code, 0);
    assert!(verify.stderr.contains("stock matches the ledger"));

    let listed = run(&mut wmsctl(db), &["tx", "list", "--location", "B", "-o", "json"]);
    assert_eq!(json(&listed).as_array().unwrap().len(), 2, "the transfer in and the adjustment");
});

idem_core::both_databases!(bad_input_exits_2_names_the_field_and_writes_nothing, |db| {
    let long_key = "k".repeat(256);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--key", "", "--qty", "1"], "invalid key: must not be empty"),
        (
            vec!["--key", "has space", "--qty", "1"],
            "invalid key: must be printable ASCII without spaces",
        ),
        (
            vec!["--key", "bell\u{7}", "--qty", "1"],
            "invalid key: must be printable ASCII without spaces",
        ),
        (vec!["--key", &long_key, "--qty", "1"], "invalid key: must be at most 255 characters"),
        (
            vec!["--key", "q", "--qty", "0"],
            "invalid qty: must be a whole number from 1 to 1000000000, got 0",
        ),
        (
            vec!["--key", "q", "--qty", "-4"],
            "invalid qty: must be a whole number from 1 to 1000000000, got -4",
        ),
        (
            vec!["--key", "q", "--qty", "1000000001"],
            "invalid qty: must be a whole number from 1 to 1000000000",
        ),
        (vec!["--key", "q", "--qty", "1.5"], "invalid value '1.5' for '--qty <N>'"),
        (vec!["--key", "q", "--qty", "1", "--frobnicate"], "unexpected argument '--frobnicate'"),
        (vec!["--key", "q", "--qty", "1", "--ttl", "soon"], "is not a duration"),
    ];
    let before = snapshot(db).await;
    for (extra, message) in cases {
        let args = [&["receive", "--sku", "S", "--location", "A"][..], &extra].concat();
        let out = run(&mut wmsctl(db), &args);
        assert_eq!(out.code, 2, "{extra:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{extra:?}");
        assert!(out.stderr.starts_with("wmsctl: "), "{extra:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(message),
            "{extra:?}: expected {message:?} in {:?}",
            out.stderr
        );
    }
    let bad_sku = run(
        &mut wmsctl(db),
        &["receive", "--key", "q", "--sku", "S;DROP TABLE stock", "--qty", "1", "--location", "A"],
    );
    assert_eq!(bad_sku.code, 2);
    assert!(
        bad_sku.stderr.contains("invalid sku: may contain only ASCII letters, digits and -_.:/"),
        "{}",
        bad_sku.stderr
    );
    let no_reason = run(
        &mut wmsctl(db),
        &["adjust", "--key", "q", "--sku", "S", "--delta", "0", "--location", "A", "--reason", "x"],
    );
    assert_eq!(no_reason.code, 2);
    assert!(
        no_reason.stderr.contains("invalid delta: must be a non-zero whole number"),
        "{}",
        no_reason.stderr
    );
    assert_eq!(snapshot(db).await, before, "a refused command wrote nothing");
});

/// Starts every command before waiting for any, so that they race; their outputs, in order.
fn all_at_once(commands: impl Iterator<Item = Command>) -> Vec<Output> {
    let children: Vec<_> = commands
        .map(|mut cmd| {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning wmsctl")
        })
        .collect();
    children.into_iter().map(|child| child.wait_with_output().unwrap()).collect()
}

idem_core::both_databases!(sixteen_processes_with_one_key_apply_once, |db| {
    let receipt =
        ["receive", "--key", "same", "--sku", "S", "--qty", "3", "--location", "A", "-o", "json"];
    let outs = all_at_once((0..16).map(|_| {
        let mut cmd = wmsctl(db);
        cmd.args(receipt);
        cmd
    }));
    let mut outcomes = Vec::new();
    for out in outs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let posted: Value = serde_json::from_slice(&out.stdout).unwrap();
        outcomes.push(posted["outcome"].as_str().unwrap().to_owned());
    }
    assert_eq!(outcomes.iter().filter(|o| *o == "applied").count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| *o == "replayed").count(), 15, "{outcomes:?}");
    assert_eq!(on_hand(db, "S", "A"), 3);
});

idem_core::both_databases!(sixteen_processes_with_their_own_keys_all_apply, |db| {
    let outs = all_at_once((0..16).map(|i| {
        let mut cmd = wmsctl(db);
        let key = format!("own-{i}");
        cmd.args(["receive", "--key", &key, "--sku", "S", "--qty", "1", "--location", "A"]);
        cmd
    }));
    for out in outs {
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(on_hand(db, "S", "A"), 16);
});

idem_core::both_databases!(keys_commands_answer_for_scripts, |db| {
    let generated = run(&mut wmsctl(db), &["keys", "generate", "-n", "3"]);
    assert_eq!(generated.code, 0);
    let lines: Vec<&str> = generated.stdout.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0] != lines[1] && lines[1] != lines[2]);

    let auto = run(
        &mut wmsctl(db),
        &["receive", "--key", "auto", "--sku", "S", "--qty", "1", "--location", "A", "-o", "json"],
    );
    assert_eq!(auto.code, 0, "{}", auto.stderr);
    let key = json(&auto)["key"].as_str().unwrap().to_owned();
    assert!(auto.stderr.contains(&format!("generated key: {key}")), "{}", auto.stderr);
    assert_eq!(json(&auto)["generated_key"], true);

    let exists = run(&mut wmsctl(db), &["keys", "exists", &key]);
    assert_eq!((exists.code, exists.stdout.as_str(), exists.stderr.as_str()), (0, "", ""));
    let missing = run(&mut wmsctl(db), &["keys", "exists", "never-used"]);
    assert_eq!((missing.code, missing.stdout.as_str(), missing.stderr.as_str()), (1, "", ""));
    let other_user = run(&mut wmsctl(db), &["keys", "exists", &key, "--user", "bob"]);
    assert_eq!(other_user.code, 1, "keys belong to their operator");

    let unknown = run(&mut wmsctl(db), &["keys", "show", "never-used", "-o", "json"]);
    assert_eq!(unknown.code, 1);
    assert_eq!(json(&unknown)["state"], "unknown");

    let listed = run(&mut wmsctl(db), &["keys", "list", "-o", "jsonl"]);
    assert_eq!(listed.code, 0);
    assert_eq!(listed.stdout.lines().count(), 1);
    let mine: Value = serde_json::from_str(listed.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(mine["key"], key.as_str());
    assert_eq!(
        run(&mut wmsctl(db), &["keys", "list", "--user", "bob", "-o", "json"]).stdout.trim(),
        "[]"
    );
    assert_eq!(
        json(&run(
            &mut wmsctl(db),
            &["keys", "list", "--all-users", "--user", "bob", "-o", "json"]
        ))
        .as_array()
        .unwrap()
        .len(),
        1
    );
});

idem_core::both_databases!(unknown_transaction_exits_1_and_bad_id_exits_2, |db| {
    let unknown = run(&mut wmsctl(db), &["tx", "show", "01934d2e-0000-7000-8000-000000000000"]);
    assert_eq!(unknown.code, 1);
    assert!(unknown.stdout.is_empty());
    assert!(
        unknown.stderr.contains("transaction \"01934d2e-0000-7000-8000-000000000000\" not found"),
        "{}",
        unknown.stderr
    );
    let bad = run(&mut wmsctl(db), &["tx", "show", "nope"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("invalid id: must be a transaction id"));

    let posted = run(
        &mut wmsctl(db),
        &["receive", "--key", "x", "--sku", "S", "--qty", "1", "--location", "A", "-o", "json"],
    );
    let id = json(&posted)["transaction"]["id"].as_str().unwrap().to_owned();
    let shown = run(&mut wmsctl(db), &["tx", "show", &id, "-o", "json"]);
    assert_eq!(shown.code, 0);
    assert_eq!(json(&shown)["id"], id.as_str());
});

idem_core::both_databases!(piped_output_is_plain_tab_separated_lines, |db| {
    let posted = run(
        &mut wmsctl(db),
        &["receive", "--key", "p-1", "--sku", "S", "--qty", "4", "--location", "A"],
    );
    assert_eq!(posted.code, 0);
    let fields: Vec<&str> = posted.stdout.trim_end().split('\t').collect();
    assert_eq!(&fields[..5], ["applied", fields[1], "receive", "S", "4"]);
    let stock = run(&mut wmsctl(db), &["stock"]);
    assert_eq!(stock.stdout, "S\tA\t4\n");
    let jsonl = run(&mut wmsctl(db), &["stock", "-o", "jsonl"]);
    assert_eq!(jsonl.stdout, "{\"sku\":\"S\",\"location\":\"A\",\"on_hand\":4}\n");
    let prometheus = run(&mut wmsctl(db), &["stock", "-o", "prometheus"]);
    assert_eq!(prometheus.code, 2);
});

idem_core::both_databases!(terminal_output_escapes_control_characters, |db| {
    let evil = "PO\u{1b}[2J\u{202e}1";
    let refused = run(
        &mut wmsctl(db),
        &[
            "receive",
            "--key",
            "e",
            "--sku",
            "S",
            "--qty",
            "1",
            "--location",
            "A",
            "--reference",
            evil,
        ],
    );
    assert_eq!(refused.code, 2, "control characters in a reference are refused");
    assert!(!refused.stderr.contains('\u{1b}'));
    let quoted = "PO 'x'; \"%\\_ 東京";
    let ok = run(
        &mut wmsctl(db),
        &[
            "receive",
            "--key",
            "q'\";%\\",
            "--sku",
            "S",
            "--qty",
            "1",
            "--location",
            "A",
            "--reference",
            quoted,
            "-o",
            "json",
        ],
    );
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(json(&ok)["transaction"]["reference"], quoted);
    assert_eq!(json(&ok)["key"], "q'\";%\\");
});

#[test]
fn malformed_database_url_is_a_configuration_error() {
    for url in ["mysql://u:hunter2@h/db", "sqlite://", "nonsense"] {
        let out = run(&mut bare(), &["--database-url", url, "--user", "a", "stock"]);
        assert_eq!(out.code, 78, "{url}: {}", out.stderr);
        assert!(out.stdout.is_empty());
        assert!(out.stderr.starts_with("wmsctl: invalid configuration"), "{}", out.stderr);
        assert!(!out.stderr.contains("hunter2"), "password leaked: {}", out.stderr);
    }
}

#[test]
fn unreachable_postgres_exits_69_quickly() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let started = Instant::now();
    let url = format!("postgres://op:s3cret-pw@127.0.0.1:{port}/wms");
    let out = run(
        &mut bare(),
        &[
            "--database-url",
            &url,
            "--user",
            "a",
            "receive",
            "--key",
            "k",
            "--sku",
            "S",
            "--qty",
            "1",
            "--location",
            "A",
        ],
    );
    assert_eq!(out.code, 69, "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(
        out.stderr.contains("database unavailable at postgres://op:****@127.0.0.1"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("s3cret-pw"));
}

#[test]
fn help_lists_exit_codes_and_hides_secrets() {
    let out = run(bare().env("WMS_DATABASE_URL", "postgres://op:s3cret-pw@db/wms"), &["--help"]);
    assert_eq!(out.code, 0);
    assert!(
        out.stdout.contains("Exit codes:\n   0  success, including a replayed duplicate"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("75  temporary failure"));
    assert!(!out.stdout.contains("s3cret-pw"), "password leaked into --help");
    for sub in [["receive", "--help"], ["keys", "--help"]] {
        let out = run(bare().env("WMS_DATABASE_URL", "postgres://op:s3cret-pw@db/wms"), &sub);
        assert_eq!(out.code, 0);
        assert!(!out.stdout.contains("s3cret-pw"));
    }
}

#[test]
fn each_posting_command_describes_itself_in_its_help() {
    let commands = [
        ("receive", "Post a goods receipt"),
        ("ship", "Post a shipment"),
        ("transfer", "Move stock from one location to another"),
        ("adjust", "Correct a count"),
    ];
    for (command, description) in commands {
        let out = run(&mut bare(), &[command, "--help"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.starts_with(description), "{command}: {}", out.stdout);
        for flag in ["--key <KEY>", "--ttl <DURATION>", "--database-url <URL>"] {
            assert!(out.stdout.contains(flag), "{command} --help lacks {flag}: {}", out.stdout);
        }
    }
}

/// Runs wmsctl with `args`, closing the reading end of its stdout at once, so that output past
/// the pipe's buffer (64 KiB) meets a closed pipe. Returns the exit code and stderr.
fn run_with_stdout_closed(cmd: &mut Command, args: &[&str]) -> (Option<i32>, String) {
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running wmsctl");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waiting for wmsctl");
    (out.status.code(), String::from_utf8(out.stderr).expect("stderr is UTF-8"))
}

#[test]
fn closed_stdout_ends_quietly_with_141() {
    let (code, stderr) =
        run_with_stdout_closed(&mut bare(), &["keys", "generate", "--count", "100000"]);
    assert_eq!((code, stderr.as_str()), (Some(141), ""));
}

idem_core::both_databases!(closed_stdout_ends_a_listing_quietly_with_141, |db| {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("receipts.csv");
    let mut csv = String::from("key,kind,sku,qty,location\n");
    for i in 0..600 {
        csv.push_str(&format!("pipe-{i},receive,SKU-{i},1,A1\n"));
    }
    std::fs::write(&file, csv).unwrap();
    let imported = run(&mut wmsctl(db), &["import", file.to_str().unwrap()]);
    assert_eq!(imported.code, 0, "{}", imported.stderr);

    let (code, stderr) =
        run_with_stdout_closed(&mut wmsctl(db), &["keys", "list", "--limit", "1000", "-o", "json"]);

    assert_eq!((code, stderr.as_str()), (Some(141), ""));
    let listed = run(&mut wmsctl(db), &["keys", "list", "--limit", "1000", "-o", "jsonl"]);
    assert_eq!(listed.stdout.lines().count(), 600, "a listing changes nothing");
});

#[test]
fn completions_are_generated() {
    let out = run(&mut bare(), &["completions", "bash"]);
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains("wmsctl"));
    assert!(out.stdout.contains("receive"));
}

/// The README's promise: no configuration, a fresh home, and the first receipt just works.
#[test]
fn default_database_is_created_owner_only_in_the_data_directory() {
    let home = tempfile::tempdir().unwrap();
    let posted = run(
        bare().env("HOME", home.path()).env_remove("XDG_DATA_HOME").env("USER", "carol"),
        &[
            "receive",
            "--key",
            "first",
            "--sku",
            "SKU-1",
            "--qty",
            "5",
            "--location",
            "A1",
            "-o",
            "json",
        ],
    );
    assert_eq!(posted.code, 0, "{}", posted.stderr);
    assert_eq!(json(&posted)["user"], "carol");
    let db = home.path().join(".local/share/wmsctl/wms.db");
    assert_mode(&db, 0o600);
    assert_mode(db.parent().unwrap(), 0o700);

    let xdg = tempfile::tempdir().unwrap();
    let posted = run(
        bare().env("HOME", home.path()).env("XDG_DATA_HOME", xdg.path()).env("USER", "carol"),
        &[
            "receive",
            "--key",
            "first",
            "--sku",
            "SKU-1",
            "--qty",
            "5",
            "--location",
            "A1",
            "-o",
            "json",
        ],
    );
    assert_eq!(
        json(&posted)["outcome"],
        "applied",
        "a different data directory is a different database"
    );
    assert!(xdg.path().join("wmsctl/wms.db").exists());
}

fn assert_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let actual = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(actual, mode, "{}: {actual:o}", path.display());
}

#[test]
fn dotenv_in_the_current_directory_is_loaded_unless_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("from-dotenv.db");
    std::fs::write(
        dir.path().join(".env"),
        format!("WMS_DATABASE_URL=sqlite://{}\nWMS_USER=dora\n", db.display()),
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path())
        .env_remove("WMS_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env_remove("WMS_USER");
    let posted = run(
        &mut cmd,
        &["receive", "--key", "d", "--sku", "S", "--qty", "1", "--location", "A", "-o", "json"],
    );
    assert_eq!(posted.code, 0, "{}", posted.stderr);
    assert_eq!(json(&posted)["user"], "dora");
    assert!(db.exists());

    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path())
        .env("HOME", home.path())
        .env_remove("XDG_DATA_HOME")
        .env("USER", "erin");
    cmd.env_remove("WMS_DATABASE_URL").env_remove("DATABASE_URL").env_remove("WMS_USER");
    let skipped = run(&mut cmd, &["--no-dotenv", "keys", "list", "-o", "json"]);
    assert_eq!(skipped.code, 0, "{}", skipped.stderr);
    assert!(
        home.path().join(".local/share/wmsctl/wms.db").exists(),
        "--no-dotenv fell back to the default"
    );
}

#[test]
fn database_url_precedence_is_flag_then_wms_then_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = |n: &str| format!("sqlite://{}", dir.path().join(n).display());
    let post = |cmd: &mut Command| {
        run(
            cmd.env("WMS_USER", "u"),
            &["receive", "--key", "k", "--sku", "S", "--qty", "1", "--location", "A"],
        )
    };
    assert_eq!(post(bare().env("DATABASE_URL", url("generic.db"))).code, 0);
    assert!(dir.path().join("generic.db").exists());
    assert_eq!(
        post(bare().env("DATABASE_URL", url("generic.db")).env("WMS_DATABASE_URL", url("wms.db")))
            .code,
        0
    );
    assert!(dir.path().join("wms.db").exists());
    assert_eq!(
        post(
            bare().env("WMS_DATABASE_URL", url("wms.db")).args(["--database-url", &url("flag.db")])
        )
        .code,
        0
    );
    assert!(dir.path().join("flag.db").exists());
}

/// PostgreSQL is only ever migrated by `db migrate`: until then every other command refuses
/// with a hint, and `db status` exits 1.
#[tokio::test]
async fn postgres_schema_is_migrated_only_on_request() {
    let Some(admin) = std::env::var("WMS_TEST_PG_URL").ok().filter(|u| !u.is_empty()) else {
        assert_ne!(
            std::env::var("WMS_REQUIRE_PG").as_deref(),
            Ok("1"),
            "WMS_TEST_PG_URL is required"
        );
        eprintln!("skipping PostgreSQL test: WMS_TEST_PG_URL is not set");
        return;
    };
    use sqlx::Connection;
    let name = format!("wms_unmigrated_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    let with = |args: &[&str]| run(bare().args(["--database-url", &url, "--user", "ops"]), args);

    let refused = with(&["stock"]);
    assert_eq!(refused.code, 78, "{}", refused.stderr);
    assert!(refused.stderr.contains("run `wmsctl db migrate`"), "{}", refused.stderr);
    let status = with(&["db", "status"]);
    assert_eq!(status.code, 1);
    assert!(status.stdout.contains("pending"), "{}", status.stdout);

    let migrated = with(&["db", "migrate"]);
    assert_eq!(migrated.code, 0, "{}", migrated.stderr);
    assert!(migrated.stderr.contains("applied 3 migration(s)"), "{}", migrated.stderr);
    assert_eq!(with(&["db", "status"]).code, 0);
    assert_eq!(with(&["db", "migrate"]).stderr, "wmsctl: schema is up to date\n");
    let audit = with(&["audit", "list", "--action", "migrate", "-o", "json"]);
    assert_eq!(json(&audit)[0]["actor"], "ops");

    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await
        .ok();
}

fn receipt<'a>(key: &'a str, qty: &'a str) -> [&'a str; 9] {
    ["receive", "--key", key, "--sku", "S", "--qty", qty, "--location", "A"]
}

/// The file's durability settings as the README promises them: WAL in the file itself, and
/// `synchronous=FULL`, which SQLite keeps per connection rather than in the file, in the
/// statement the binary runs on every connection it opens (sqlx logs it at debug).
#[tokio::test]
async fn a_new_sqlite_file_is_in_wal_mode_with_full_sync() {
    use sqlx::Connection;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fresh.db");
    let url = format!("sqlite://{}", path.display());

    let posted = run(
        bare().args(["--database-url", &url, "--user", "u"]).env("WMS_LOG", "sqlx::query=debug"),
        &receipt("wal-1", "1"),
    );
    assert_eq!(posted.code, 0, "{}", posted.stderr);
    assert!(posted.stdout.starts_with("applied\t"), "{}", posted.stdout);

    let header = std::fs::read(&path).unwrap();
    assert_eq!((header[18], header[19]), (2, 2), "file format bytes of a WAL database");
    let options = SqliteConnectOptions::new().filename(&path).read_only(true);
    let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
    let mode: String =
        sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    assert_eq!(mode, "wal");

    let inits: Vec<&str> =
        posted.stderr.lines().filter(|l| l.contains("PRAGMA journal_mode")).collect();
    assert!(!inits.is_empty(), "no connection setup was logged: {}", posted.stderr);
    for init in inits {
        assert!(init.contains("PRAGMA journal_mode = WAL"), "connection without WAL: {init}");
        assert!(init.contains("PRAGMA synchronous = FULL"), "connection without FULL: {init}");
    }
}

/// Sixteen processes on a file (and a directory) that do not exist yet: the migration runs
/// once, and no posting is lost to the race.
#[test]
fn sixteen_processes_on_a_fresh_sqlite_file_migrate_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new").join("wms.db");
    let url = format!("sqlite://{}", path.display());
    let wms = || {
        let mut cmd = bare();
        cmd.args(["--database-url", &url, "--user", "u"]);
        cmd
    };

    let outs = all_at_once((0..16).map(|i| {
        let mut cmd = wms();
        cmd.args(receipt(&format!("race-{i}"), "3"));
        cmd
    }));
    for out in outs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stderr.is_empty(), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("applied\t"));
    }

    let ledger = run(&mut wms(), &["tx", "list", "-o", "json"]);
    assert_eq!(json(&ledger).as_array().unwrap().len(), 16, "{}", ledger.stdout);
    let stock = run(&mut wms(), &["stock", "-o", "json"]);
    assert_eq!(json(&stock), serde_json::json!([{"sku": "S", "location": "A", "on_hand": 48}]));
    let status = run(&mut wms(), &["db", "status"]);
    assert_eq!(status.code, 0, "{}{}", status.stdout, status.stderr);
    let migrations = run(&mut wms(), &["audit", "list", "--action", "migrate", "-o", "json"]);
    assert_eq!(migrations.code, 0, "{}", migrations.stderr);
    let migrations = json(&migrations);
    assert_eq!(migrations.as_array().unwrap().len(), 1, "{migrations:#}");
    assert_eq!(migrations[0]["actor"], "wmsctl");
}

/// Hand-written SQL on the test database, past the library, as a careless administrator would.
async fn tamper(db: &TestDb, sql: &'static str) {
    use idem_core::Store;
    match db.store() {
        Store::Sqlite(s) => sqlx::raw_sql(sql).execute(s.pool()).await.map(drop),
        Store::Postgres(p) => sqlx::raw_sql(sql).execute(p.pool()).await.map(drop),
    }
    .unwrap_or_else(|err| panic!("{sql}: {err}"));
}

idem_core::both_databases!(stock_verify_names_rows_changed_behind_the_ledger, |db| {
    assert_eq!(run(&mut wmsctl(db), &receipt("v-1", "5")).code, 0);
    let moved = run(
        &mut wmsctl(db),
        &["transfer", "--key", "v-2", "--sku", "S", "--qty", "2", "--from", "A", "--to", "B"],
    );
    assert_eq!(moved.code, 0, "{}", moved.stderr);
    let clean = run(&mut wmsctl(db), &["stock", "--verify"]);
    assert_eq!(
        (clean.code, clean.stdout.as_str(), clean.stderr.as_str()),
        (0, "", "wmsctl: stock matches the ledger\n")
    );

    tamper(
        db,
        "UPDATE stock SET on_hand = 9 WHERE sku = 'S' AND location = 'A'; \
         DELETE FROM stock WHERE sku = 'S' AND location = 'B'; \
         INSERT INTO stock (sku, location, on_hand) VALUES ('GHOST', 'Z', 4)",
    )
    .await;
    let found = run(&mut wmsctl(db), &["stock", "--verify"]);
    assert_eq!(found.code, 1, "{}", found.stderr);
    assert_eq!(found.stdout, "GHOST\tZ\t4\t0\nS\tA\t9\t3\nS\tB\t0\t2\n");
    assert_eq!(found.stderr, "wmsctl: warning: stock differs from the ledger at 3 place(s)\n");
    let as_json = run(&mut wmsctl(db), &["stock", "--verify", "-o", "json"]);
    assert_eq!(as_json.code, 1, "{}", as_json.stderr);
    assert_eq!(
        json(&as_json),
        serde_json::json!({"consistent": false, "differences": [
            {"sku": "GHOST", "location": "Z", "on_hand": 4, "ledger_sum": 0},
            {"sku": "S", "location": "A", "on_hand": 9, "ledger_sum": 3},
            {"sku": "S", "location": "B", "on_hand": 0, "ledger_sum": 2},
        ]})
    );

    // Put it back, for the check that follows every test body.
    tamper(
        db,
        "UPDATE stock SET on_hand = 3 WHERE sku = 'S' AND location = 'A'; \
         INSERT INTO stock (sku, location, on_hand) VALUES ('S', 'B', 2); \
         DELETE FROM stock WHERE sku = 'GHOST'",
    )
    .await;
    assert_eq!(run(&mut wmsctl(db), &["stock", "--verify"]).code, 0);
});

/// The README's first command, twice, in a home with nothing in it.
#[test]
fn readme_first_command_twice_in_a_fresh_home_is_replayed() {
    let root = tempfile::tempdir().unwrap();
    let (home, data) = (root.path().join("home"), root.path().join("data"));
    std::fs::create_dir(&home).unwrap();
    let first_receipt = || {
        let mut cmd = bare();
        cmd.env("HOME", &home).env("XDG_DATA_HOME", &data).env("USER", "carol");
        cmd
    };
    let args = ["receive", "--key", "first-receipt", "--sku", "SKU-1", "--qty", "5", "--location"];
    let args = [&args[..], &["A1"]].concat();

    let first = run(&mut first_receipt(), &args);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.stderr, "");
    let first: Vec<&str> = first.stdout.trim_end().split('\t').collect();
    assert_eq!(first[0], "applied");

    let again = run(&mut first_receipt(), &args);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.starts_with(&format!(
            "wmsctl: replayed: key first-receipt was already applied as transaction {}",
            first[1]
        )),
        "{}",
        again.stderr
    );
    let again: Vec<&str> = again.stdout.trim_end().split('\t').collect();
    assert_eq!((again[0], again[1]), ("replayed", first[1]));

    let stock = run(&mut first_receipt(), &["stock", "-o", "json"]);
    assert_eq!(json(&stock), serde_json::json!([{"sku": "SKU-1", "location": "A1", "on_hand": 5}]));
    assert!(data.join("wmsctl/wms.db").exists());
    assert!(!home.join(".local").exists(), "XDG_DATA_HOME wins over HOME");
}

#[test]
fn environment_beats_dotenv_and_no_dotenv_anywhere_ignores_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = |n: &str| format!("sqlite://{}", dir.path().join(n).display());
    std::fs::write(
        dir.path().join(".env"),
        format!("WMS_DATABASE_URL={}\nWMS_USER=dora\n", url("from-dotenv.db")),
    )
    .unwrap();
    let in_dir = || {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path()).stdin(Stdio::null());
        for var in ["WMS_DATABASE_URL", "DATABASE_URL", "WMS_USER", "WMS_KEY_TTL", "WMS_LOG"] {
            cmd.env_remove(var);
        }
        cmd
    };
    let args = [&receipt("e-1", "1")[..], &["-o", "json"]].concat();

    let posted =
        run(in_dir().env("WMS_DATABASE_URL", url("from-env.db")).env("WMS_USER", "erin"), &args);
    assert_eq!(posted.code, 0, "{}", posted.stderr);
    assert_eq!(json(&posted)["user"], "erin");
    assert!(dir.path().join("from-env.db").exists());
    assert!(!dir.path().join("from-dotenv.db").exists(), "the .env file overrode the environment");

    let skipped = run(
        in_dir().env("DATABASE_URL", url("generic.db")).env("USER", "frank"),
        &[&args[..], &["--no-dotenv"]].concat(),
    );
    assert_eq!(skipped.code, 0, "{}", skipped.stderr);
    assert_eq!(json(&skipped)["user"], "frank", "WMS_USER came from the ignored .env");
    assert!(dir.path().join("generic.db").exists());
    assert!(!dir.path().join("from-dotenv.db").exists(), "--no-dotenv still loaded .env");
}

fn audit_actions(out: &Run) -> Vec<String> {
    assert_eq!(out.code, 0, "{}", out.stderr);
    json(out).as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap().into()).collect()
}

idem_core::both_databases!(audit_list_filters_by_limit_time_and_action, |db| {
    assert_eq!(run(&mut wmsctl(db), &receipt("a-1", "1")).code, 0);
    assert_eq!(run(&mut wmsctl(db), &receipt("a-1", "1")).code, 0);
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    assert_eq!(run(&mut wmsctl(db), &receipt("a-1", "2")).code, 3);
    let list = |extra: &[&str]| {
        audit_actions(&run(
            &mut wmsctl(db),
            &[&["audit", "list", "-o", "json"][..], extra].concat(),
        ))
    };

    // Every fresh test database starts with the entry for its own migration.
    assert_eq!(list(&[]), ["conflict", "replayed", "migrate"]);
    assert_eq!(list(&["--limit", "1"]), ["conflict"]);
    assert_eq!(list(&["--since", &between]), ["conflict"]);
    assert_eq!(list(&["--since", "2999-01-01"]), Vec::<String>::new());
    assert_eq!(list(&["--since", "2000-01-01"]), ["conflict", "replayed", "migrate"]);
    assert_eq!(list(&["--since", "1h"]), ["conflict", "replayed", "migrate"]);
    assert_eq!(list(&["--action", "replayed", "--limit", "1"]), ["replayed"]);
    assert_eq!(list(&["--action", "cleanup"]), Vec::<String>::new());

    let newest = run(&mut wmsctl(db), &["audit", "list", "--limit", "1", "-o", "json"]);
    assert_eq!(json(&newest)[0]["key"], "a-1");
    assert_eq!(json(&newest)[0]["actor"], "alice");

    let bad = run(&mut wmsctl(db), &["audit", "list", "--action", "nonsense"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stdout.is_empty());
    assert_eq!(
        bad.stderr,
        "wmsctl: invalid action: must be one of replayed, duplicate_refused, conflict, \
         expired_key_reused, cleanup, migrate, got \"nonsense\"\n"
    );
});

async fn audit_entries(db: &TestDb) -> usize {
    db.store().audit(&idem_core::AuditFilter::default()).await.unwrap().len()
}

idem_core::both_databases!(bad_values_for_other_commands_exit_2_and_write_nothing, |db| {
    assert_eq!(run(&mut wmsctl(db), &receipt("b-1", "1")).code, 0);
    // A line that would be applied if the import went ahead despite a refused flag.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.csv");
    std::fs::write(
        &file,
        "key,kind,sku,qty,location,to_location,reference,reason\nb-2,receive,S,1,A,,,\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["keys", "generate", "-n", "0"], "invalid value '0' for '--count <N>'"),
        (vec!["keys", "generate", "-n", "100001"], "invalid value '100001' for '--count <N>'"),
        (vec!["tx", "list", "--limit", "x"], "invalid value 'x' for '--limit <N>'"),
        (vec!["tx", "list", "--since", "junk"], "invalid value 'junk' for '--since <WHEN>'"),
        (vec!["keys", "cleanup", "--batch-size", "0"], "invalid value '0' for '--batch-size <N>'"),
        (
            vec!["keys", "cleanup", "--max-runtime", "0s"],
            "invalid value '0s' for '--max-runtime <DURATION>'",
        ),
        (vec!["import", file, "--max-errors", "0"], "invalid value '0' for '--max-errors <N>'"),
        (vec!["import", file, "--chunk-size", "0"], "invalid value '0' for '--chunk-size <N>'"),
        (vec!["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (vec!["keys", "frobnicate"], "unrecognized subcommand 'frobnicate'"),
    ];
    let before = (snapshot(db).await, audit_entries(db).await);
    for (args, message) in cases {
        let out = run(&mut wmsctl(db), &args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
        assert!(out.stderr.contains(message), "{args:?}: expected {message:?} in {}", out.stderr);
    }
    assert_eq!(
        (snapshot(db).await, audit_entries(db).await),
        before,
        "a refused command wrote nothing"
    );
});

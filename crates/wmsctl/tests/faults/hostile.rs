//! Hostile input: quotes, semicolons, backslashes, percent signs, look-alike letters, text
//! direction marks and control characters in every field a person types. Each value is either
//! refused by the documented rule, naming the field, or stored and shown back verbatim, and both
//! databases answer alike; whatever a terminal is shown has its control characters escaped.

use idem_core::testing::TestDb;
use idem_core::{Store, Transaction};
use serde_json::Value;

use crate::support::*;

/// What a command did, with the parts that differ between runs (ids, times) removed, so that
/// the two databases' answers can be compared.
#[derive(Debug, PartialEq)]
struct Answer {
    code: i32,
    stderr: String,
    json: Option<Value>,
}

fn answer(url: &str, args: &[&str]) -> Answer {
    let out = run(&mut wmsctl(url), &[args, &["-o", "json"]].concat());
    let json = (out.code == 0).then(|| without_ids_and_times(json(&out)));
    Answer { code: out.code, stderr: masked(&out.stderr), json }
}

/// Text with its transaction ids and times replaced by placeholders.
fn masked(text: &str) -> String {
    let word = |w: &str| {
        let bare = w.trim_end_matches([';', ',']);
        let digits_and = |s: &str, extra: char| s.chars().all(|c| c.is_ascii_digit() || c == extra);
        if uuid::Uuid::parse_str(bare).is_ok() {
            "<id>".to_owned()
        } else if bare.len() == 10 && digits_and(bare, '-') {
            "<date>".to_owned()
        } else if bare.len() == 9 && bare.ends_with('Z') && digits_and(&bare[..8], ':') {
            "<time>".to_owned()
        } else {
            w.to_owned()
        }
    };
    text.lines().map(|l| l.split(' ').map(word).collect::<Vec<_>>().join(" ") + "\n").collect()
}

fn without_ids_and_times(mut value: Value) -> Value {
    match &mut value {
        Value::Object(map) => {
            for field in ["id", "transaction_id", "created_at", "expires_at", "last_replay_at"] {
                map.remove(field);
            }
            for v in map.values_mut() {
                *v = without_ids_and_times(v.take());
            }
        }
        Value::Array(items) => {
            for v in items {
                *v = without_ids_and_times(v.take());
            }
        }
        _ => {}
    }
    value
}

/// Values that are fine where they go: each must come back exactly as typed.
const KEPT_KEYS: &[&str] = &[
    "q'\"`",
    "a';DROP_TABLE_idem_keys;--",
    "back\\slash\\\\",
    "100%_x%%s%n",
    "${HOME}$(id)",
    "<script>&amp;",
];
const KEPT_TEXT: &[&str] = &[
    "PO 'x'; \"y\" -- \\ 100% _ %s %n",
    "Rеf-Ѕ1 (Cyrillic е and Ѕ, Greek Ο)",
    "東京 · Ünïcödé · emoji 📦",
    "O'Brien\\; DROP TABLE ledger; --",
    "e\u{301} combining, ﬁ ligature, ｆｕｌｌｗｉｄｔｈ",
];

/// Values refused by a rule, with the start of the message that names the field.
fn refused_cases() -> Vec<(Vec<String>, &'static str)> {
    let post = |key: &str, sku: &str, location: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["receive", "--key", key, "--sku", sku, "--qty", "1", "--location"];
        args.push(location);
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect()
    };
    let key_rule = "wmsctl: invalid key: must be printable ASCII without spaces, found ";
    let sku_rule = "wmsctl: invalid sku: may contain only ASCII letters, digits and -_.:/";
    let location_rule = "wmsctl: invalid location: may contain only ASCII letters, digits";
    let reference_rule =
        "wmsctl: invalid reference: must not contain control or text-direction characters";
    let reason_rule = "wmsctl: invalid reason: must not contain control or text-direction";
    let mut cases = Vec::new();
    for key in [
        "k\u{435}y",
        "a\u{200f}b",
        "\u{202e}gnp.exe",
        "bell\u{7}",
        "esc\u{1b}[2J",
        "tab\there",
        "zero\u{200b}width",
        "semi\u{ff1b}colon",
        "new\nline",
    ] {
        cases.push((post(key, "S", "A", &[]), key_rule));
    }
    for sku in ["S';DROP TABLE stock;--", "S%", "S\\", "\u{405}KU", "S\u{200f}", "S\u{1b}"] {
        cases.push((post("sku-case", sku, "A", &[]), sku_rule));
    }
    for location in ["A B", "A'--", "A\u{202e}", "\u{391}1"] {
        cases.push((post("location-case", "S", location, &[]), location_rule));
    }
    for text in ["PO\u{1b}[2J", "a\u{202e}b", "a\u{2066}b", "line\nbreak", "cr\rhere", "bell\u{7}"]
    {
        cases.push((post("reference-case", "S", "A", &["--reference", text]), reference_rule));
        let adjust = ["adjust", "--key", "reason-case", "--sku", "S", "--delta", "1"];
        let mut args: Vec<String> = adjust.iter().map(|s| s.to_string()).collect();
        args.extend(["--location", "A", "--reason", text].map(str::to_owned));
        cases.push((args, reason_rule));
    }
    let user = ["--user", "bob'; --", "receive", "--key", "u", "--sku", "S"];
    let mut args: Vec<String> = user.iter().map(|s| s.to_string()).collect();
    args.extend(["--qty", "1", "--location", "A"].map(str::to_owned));
    cases.push((args, "wmsctl: invalid user: may contain only ASCII letters, digits and -_.@"));
    cases
}

/// Every refused value exits 2 with its rule, shows only escaped characters, writes nothing;
/// every kept value round-trips through posting, `tx show` and `keys show`; and SQLite and
/// PostgreSQL give the same answers, byte for byte apart from ids and times.
#[tokio::test]
async fn hostile_input_is_refused_or_kept_verbatim_alike_on_both_databases() {
    let sqlite = TestDb::sqlite().await;
    let postgres = TestDb::postgres().await;
    let mut answers: Vec<Vec<Answer>> = Vec::new();
    for db in std::iter::once(&sqlite).chain(postgres.as_ref()) {
        let url = db.url();
        let mut these = Vec::new();
        let before = snapshot(url).await;
        for (args, rule) in refused_cases() {
            let mut cmd = bare();
            cmd.args(["--database-url", url]);
            if args[0] != "--user" {
                cmd.args(["--user", "alice"]);
            }
            let out = run(&mut cmd, &strs(&args));
            assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
            assert!(out.stdout.is_empty(), "{args:?}");
            assert!(
                out.stderr.starts_with(rule),
                "{args:?}: expected {rule:?}, got {:?}",
                out.stderr
            );
            assert_printable(&out.stderr);
            these.push(Answer { code: out.code, stderr: out.stderr, json: None });
        }
        assert_eq!(snapshot(url).await, before, "refused input wrote nothing");

        for (i, key) in KEPT_KEYS.iter().enumerate() {
            let text = KEPT_TEXT[i % KEPT_TEXT.len()];
            let posted = answer(
                url,
                &[
                    "receive",
                    "--key",
                    key,
                    "--sku",
                    "S-1_a.b:c/d",
                    "--qty",
                    "1",
                    "--location",
                    "A",
                    "--reference",
                    text,
                ],
            );
            assert_eq!(posted.code, 0, "{key:?}: {}", posted.stderr);
            let json = posted.json.as_ref().unwrap();
            assert_eq!(json["key"], *key);
            assert_eq!(json["transaction"]["key"], *key);
            assert_eq!(json["transaction"]["reference"], text);
            assert_eq!(json["transaction"]["sku"], "S-1_a.b:c/d");
            let shown = answer(url, &["keys", "show", key]);
            assert_eq!(shown.code, 0, "{key:?}: {}", shown.stderr);
            assert_eq!(shown.json.as_ref().unwrap()["key"], *key);
            assert_eq!(shown.json.as_ref().unwrap()["request"]["reference"], text);
            assert_eq!(run(&mut wmsctl(url), &["keys", "exists", key]).code, 0, "{key:?}");
            let replayed = answer(
                url,
                &[
                    "receive",
                    "--key",
                    key,
                    "--sku",
                    "S-1_a.b:c/d",
                    "--qty",
                    "1",
                    "--location",
                    "A",
                    "--reference",
                    text,
                ],
            );
            assert_eq!(replayed.json.as_ref().unwrap()["outcome"], "replayed", "{key:?}");
            these.extend([posted, shown, replayed]);
        }
        for (i, reason) in KEPT_TEXT.iter().enumerate() {
            let key = format!("reason-{i}");
            let counted = answer(
                url,
                &[
                    "adjust",
                    "--key",
                    &key,
                    "--sku",
                    "S",
                    "--delta",
                    "+2",
                    "--location",
                    "A",
                    "--reason",
                    reason,
                ],
            );
            assert_eq!(counted.code, 0, "{reason:?}: {}", counted.stderr);
            assert_eq!(counted.json.as_ref().unwrap()["transaction"]["reason"], *reason);
            let plain = run(&mut wmsctl(url), &["tx", "list", "--limit", "1", "-o", "plain"]);
            assert!(
                plain.stdout.contains(&format!("\t{reason}\t")),
                "{reason:?} in {:?}",
                plain.stdout
            );
            these.push(counted);
        }
        these.push(answer(url, &["tx", "list"]));
        these.push(answer(url, &["stock"]));
        answers.push(these);
    }
    if let [on_sqlite, on_postgres] = &answers[..] {
        assert_eq!(on_sqlite.len(), on_postgres.len());
        for (a, b) in on_sqlite.iter().zip(on_postgres) {
            assert_eq!(a, b, "SQLite and PostgreSQL answered differently");
        }
    }
}

idem_core::both_databases!(stored_control_characters_are_escaped_in_tables_and_plain_lines, |db| {
    // Text that no wmsctl command accepts, written by some other program straight into the
    // database: still shown escaped, never interpreted by the terminal.
    let url = db.url();
    let posted =
        run(&mut wmsctl(url), &[&strs(&receipt("clean", 1))[..], &["-o", "json"]].concat());
    let id = json(&posted)["transaction"]["id"].as_str().unwrap().parse().unwrap();
    let clean = db.store().transaction(id).await.unwrap().unwrap();
    let evil = "PO\u{1b}[2J\u{1b}]0;owned\u{7}\u{202e}fdp.exe\nsecond line\r\tend";
    let planted = Transaction {
        id: uuid::Uuid::now_v7(),
        reference: Some(evil.to_owned()),
        key: "planted\u{1b}[31m".to_owned(),
        ..clean
    };
    insert_ledger_row(db.store(), &planted).await;

    for format in ["plain", "table"] {
        for args in [
            vec!["tx", "show", &planted.id.to_string(), "-o", format],
            vec!["tx", "list", "-o", format],
        ] {
            let out = run(&mut wmsctl(url), &args);
            assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
            assert_printable(&out.stdout);
            assert!(
                out.stdout.contains(
                    "PO\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\u{202e}fdp.exe\\nsecond line\\r\\tend"
                ),
                "{args:?}: {}",
                out.stdout
            );
            assert!(out.stdout.contains("planted\\u{1b}[31m"), "{args:?}: {}", out.stdout);
        }
    }
    let as_json = run(&mut wmsctl(url), &["tx", "show", &planted.id.to_string(), "-o", "json"]);
    assert_eq!(json(&as_json)["reference"], evil, "JSON carries the stored text exactly");
});

/// Fails on any character that a terminal would act on rather than show, apart from the line
/// ends and the tabs that separate plain fields.
fn assert_printable(text: &str) {
    let bad = text.chars().find(|c| {
        (c.is_control() && !matches!(c, '\n' | '\t'))
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    });
    assert!(bad.is_none(), "unescaped {:?} in {text:?}", bad.unwrap());
}

async fn insert_ledger_row(store: &Store, t: &Transaction) {
    let insert = "INSERT INTO ledger (id, kind, sku, qty, location, to_location, reference, \
                  reason, user_name, idem_key, created_at) \
                  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
    let restock = "UPDATE stock SET on_hand = on_hand + $1 WHERE sku = $2 AND location = $3";
    match store {
        Store::Sqlite(s) => {
            sqlx::query(insert)
                .bind(t.id.to_string())
                .bind(t.kind.as_str())
                .bind(&t.sku)
                .bind(t.qty)
                .bind(&t.location)
                .bind(&t.to_location)
                .bind(&t.reference)
                .bind(&t.reason)
                .bind(&t.user)
                .bind(&t.key)
                .bind(t.created_at.timestamp_micros())
                .execute(s.pool())
                .await
                .unwrap();
            sqlx::query(restock)
                .bind(t.qty)
                .bind(&t.sku)
                .bind(&t.location)
                .execute(s.pool())
                .await
                .unwrap();
        }
        Store::Postgres(p) => {
            sqlx::query(insert)
                .bind(t.id)
                .bind(t.kind.as_str())
                .bind(&t.sku)
                .bind(t.qty)
                .bind(&t.location)
                .bind(&t.to_location)
                .bind(&t.reference)
                .bind(&t.reason)
                .bind(&t.user)
                .bind(&t.key)
                .bind(t.created_at)
                .execute(p.pool())
                .await
                .unwrap();
            sqlx::query(restock)
                .bind(t.qty)
                .bind(&t.sku)
                .bind(&t.location)
                .execute(p.pool())
                .await
                .unwrap();
        }
    }
}

idem_core::both_databases!(import_refuses_nul_and_control_characters_line_by_line, |db| {
    // A file can carry what no command line can: NUL bytes, escape sequences, direction marks.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.csv");
    let kept = "PO ;' % \\ \"quoted\" Ѕ東京";
    std::fs::write(
        &file,
        format!(
            "key,kind,sku,qty,location,to_location,reference,reason\n\
             k\0ey,receive,S,1,A,,,\n\
             nul-ref,receive,S,1,A,,PO\0x,\n\
             esc-ref,receive,S,1,A,,PO\u{1b}[2J,\n\
             rtl-ref,receive,S,1,A,,PO \u{202e} x,\n\
             sku-nul,receive,S\0,1,A,,,\n\
             kept,receive,S,1,A,,\"{}\",\n",
            kept.replace('"', "\"\"")
        ),
    )
    .unwrap();
    let name = file.display().to_string();
    let out = run(&mut wmsctl(db.url()), &["import", &name]);
    assert_eq!(out.code, 65, "{}", out.stderr);
    assert_printable(&out.stderr);
    let key_rule = "invalid key: must be printable ASCII without spaces, found \\u{0}";
    let text_rule = "invalid reference: must not contain control or text-direction characters";
    for (line, message) in [
        (2, key_rule.to_owned()),
        (3, format!("{text_rule}, found \\u{{0}}")),
        (4, format!("{text_rule}, found \\u{{1b}}")),
        (5, format!("{text_rule}, found \\u{{202e}}")),
        (6, "invalid sku: may contain only ASCII letters, digits and -_.:/".to_owned()),
    ] {
        assert!(
            out.stderr.contains(&format!("wmsctl: {name}:{line}: {message}")),
            "{}",
            out.stderr
        );
    }
    let ledger = run(&mut wmsctl(db.url()), &["tx", "list", "-o", "json"]);
    let rows = json(&ledger);
    assert_eq!(rows.as_array().unwrap().len(), 1, "only the clean line was posted");
    assert_eq!(rows[0]["key"], "kept");
    assert_eq!(rows[0]["reference"], kept);
});

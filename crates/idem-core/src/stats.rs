//! Key statistics: how many keys are live and how many await cleanup, how old the oldest live key
//! is, and, per kind and operator, live keys and the replays and conflicts that the audit log
//! recorded. Rendered as the Prometheus text exposition format by [`to_prometheus`], for the
//! node-exporter textfile collector; JSON comes from the `Serialize` impl.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;

/// The kind that audit entries are counted under when they name no transaction in the ledger
/// (entries written by callers of the claim step for their own work).
pub const UNKNOWN_KIND: &str = "unknown";

/// Live keys, replays and conflicts of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Keys not yet expired.
    pub live: u64,
    /// Duplicate postings answered with the original transaction (audit action `replayed`).
    pub replays: u64,
    /// Postings refused because the key was used for a different request (`conflict`).
    pub conflicts: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.live += other.live;
        self.replays += other.replays;
        self.conflicts += other.conflicts;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindCounts {
    pub kind: String,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserCounts {
    pub user: String,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindUserCounts {
    pub kind: String,
    pub user: String,
    #[serde(flatten)]
    pub counts: Counts,
}

/// The state of the key table at one instant, and the duplicates seen since a given time.
///
/// Live and expired keys are read from the key table as of `at`. Replays and conflicts are read
/// from the audit log, from `since` on (or all of it), and counted under the operator who posted
/// the duplicate and the kind of the original transaction the entry names, looked up in the
/// ledger: the ledger keeps every transaction, so the kind stays right after the key is cleaned
/// up or reused for another kind, where the key table would have forgotten it. A conflicting
/// request of a different kind therefore counts under the kind of the transaction it collided
/// with. Entries naming no ledger transaction count under [`UNKNOWN_KIND`]. The groups hold
/// every (kind, operator) pair with a live key or a counted entry, sorted by kind then operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyStats {
    /// The instant the key table was read at.
    pub at: DateTime<Utc>,
    /// The start of the window replays and conflicts were counted in; `None` counts them all.
    pub since: Option<DateTime<Utc>>,
    /// Keys not yet expired at `at`.
    pub live: u64,
    /// Keys expired at `at` and not yet removed by cleanup.
    pub expired: u64,
    /// When the oldest live key was created; `None` when no key is live.
    pub oldest_live_created_at: Option<DateTime<Utc>>,
    pub replays: u64,
    pub conflicts: u64,
    pub by_kind: Vec<KindCounts>,
    pub by_user: Vec<UserCounts>,
    pub by_kind_and_user: Vec<KindUserCounts>,
}

/// Live keys of one (kind, operator), as a store reads them.
#[derive(Debug)]
pub(crate) struct LiveGroup {
    pub kind: String,
    pub user: String,
    pub live: u64,
    pub oldest_created_at: DateTime<Utc>,
}

/// Replays and conflicts of one (kind, operator), as a store reads them.
#[derive(Debug)]
pub(crate) struct DuplicateGroup {
    pub kind: String,
    pub user: String,
    pub replays: u64,
    pub conflicts: u64,
}

/// A `COUNT(*)` as the database returns it; never negative.
pub(crate) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or_default()
}

impl KeyStats {
    /// Puts the rows each store reads together into totals and groups.
    pub(crate) fn assemble(
        at: DateTime<Utc>,
        since: Option<DateTime<Utc>>,
        expired: u64,
        live: Vec<LiveGroup>,
        duplicates: Vec<DuplicateGroup>,
    ) -> KeyStats {
        let oldest_live_created_at = live.iter().map(|g| g.oldest_created_at).min();
        let mut groups: BTreeMap<(String, String), Counts> = BTreeMap::new();
        for g in live {
            groups.entry((g.kind, g.user)).or_default().live += g.live;
        }
        for g in duplicates {
            let counts = groups.entry((g.kind, g.user)).or_default();
            counts.replays += g.replays;
            counts.conflicts += g.conflicts;
        }

        let mut total = Counts::default();
        let mut by_kind: BTreeMap<&str, Counts> = BTreeMap::new();
        let mut by_user: BTreeMap<&str, Counts> = BTreeMap::new();
        for ((kind, user), counts) in &groups {
            total.add(*counts);
            by_kind.entry(kind).or_default().add(*counts);
            by_user.entry(user).or_default().add(*counts);
        }
        KeyStats {
            at,
            since,
            live: total.live,
            expired,
            oldest_live_created_at,
            replays: total.replays,
            conflicts: total.conflicts,
            by_kind: by_kind
                .into_iter()
                .map(|(kind, counts)| KindCounts { kind: kind.to_owned(), counts })
                .collect(),
            by_user: by_user
                .into_iter()
                .map(|(user, counts)| UserCounts { user: user.to_owned(), counts })
                .collect(),
            by_kind_and_user: groups
                .into_iter()
                .map(|((kind, user), counts)| KindUserCounts { kind, user, counts })
                .collect(),
        }
    }

    /// How long the oldest live key has existed at `at`; `None` when no key is live.
    pub fn oldest_live_age(&self) -> Option<TimeDelta> {
        self.oldest_live_created_at.map(|created| (self.at - created).max(TimeDelta::zero()))
    }
}

/// Renders the statistics in the Prometheus text exposition format (version 0.0.4), ready for
/// the node-exporter textfile collector: `wms_keys_live`, `wms_keys_expired` and
/// `wms_oldest_live_key_age_seconds` (0 when no key is live) as gauges, and
/// `wms_key_replays_total` and `wms_key_conflicts_total` per `kind` and `user`.
///
/// Without a window (`since` is `None`) the replay and conflict numbers count the whole audit
/// log, which only grows, and are typed `counter` so that `rate()` works on them. With a window
/// they can go down between scrapes, which a counter must never do, so they are typed `gauge`.
/// No sample carries a timestamp: the textfile collector refuses them.
pub fn to_prometheus(stats: &KeyStats) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, value: String| {
        family_header(out, name, help, "gauge");
        let _ = writeln!(out, "{name} {value}");
    };
    gauge(
        &mut out,
        "wms_keys_live",
        "Idempotency keys that have not expired.",
        stats.live.to_string(),
    );
    gauge(
        &mut out,
        "wms_keys_expired",
        "Idempotency keys that have expired and await cleanup.",
        stats.expired.to_string(),
    );
    let age = stats.oldest_live_age().unwrap_or_default();
    gauge(
        &mut out,
        "wms_oldest_live_key_age_seconds",
        "Age of the oldest live idempotency key, 0 when none is live.",
        seconds(age),
    );

    let kind = if stats.since.is_none() { "counter" } else { "gauge" };
    per_group(
        &mut out,
        stats,
        "wms_key_replays_total",
        "Duplicate postings answered with the original transaction, by kind and operator.",
        kind,
        |c| c.replays,
    );
    per_group(
        &mut out,
        stats,
        "wms_key_conflicts_total",
        "Postings refused because their key was used for a different request, by kind and \
         operator.",
        kind,
        |c| c.conflicts,
    );
    out
}

/// One metric family with a sample per (kind, operator) group.
fn per_group(
    out: &mut String,
    stats: &KeyStats,
    name: &str,
    help: &str,
    kind: &str,
    value: fn(&Counts) -> u64,
) {
    family_header(out, name, help, kind);
    for group in &stats.by_kind_and_user {
        let _ = writeln!(
            out,
            "{name}{{kind=\"{}\",user=\"{}\"}} {}",
            escape_label(&group.kind),
            escape_label(&group.user),
            value(&group.counts),
        );
    }
}

fn family_header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Seconds with millisecond precision, written as Prometheus reads a float.
fn seconds(age: TimeDelta) -> String {
    let millis = age.num_milliseconds();
    format!("{}.{:03}", millis / 1000, millis % 1000)
}

/// A label value may hold anything; backslash, double quote and line feed must be escaped.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help text escapes only backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    fn sample() -> KeyStats {
        KeyStats::assemble(
            at(100),
            None,
            4,
            vec![
                LiveGroup {
                    kind: "ship".into(),
                    user: "bob".into(),
                    live: 2,
                    oldest_created_at: at(50),
                },
                LiveGroup {
                    kind: "receive".into(),
                    user: "alice".into(),
                    live: 3,
                    oldest_created_at: at(-1),
                },
            ],
            vec![
                DuplicateGroup {
                    kind: "receive".into(),
                    user: "alice".into(),
                    replays: 2,
                    conflicts: 1,
                },
                DuplicateGroup {
                    kind: "ship".into(),
                    user: "carol".into(),
                    replays: 0,
                    conflicts: 5,
                },
            ],
        )
    }

    #[test]
    fn assemble_merges_groups_and_totals() {
        let stats = sample();
        assert_eq!((stats.live, stats.expired, stats.replays, stats.conflicts), (5, 4, 2, 6));
        assert_eq!(stats.oldest_live_created_at, Some(at(-1)));
        assert_eq!(stats.oldest_live_age(), Some(TimeDelta::seconds(101)));
        let groups: Vec<(&str, &str, Counts)> = stats
            .by_kind_and_user
            .iter()
            .map(|g| (g.kind.as_str(), g.user.as_str(), g.counts))
            .collect();
        assert_eq!(
            groups,
            [
                ("receive", "alice", Counts { live: 3, replays: 2, conflicts: 1 }),
                ("ship", "bob", Counts { live: 2, replays: 0, conflicts: 0 }),
                ("ship", "carol", Counts { live: 0, replays: 0, conflicts: 5 }),
            ]
        );
        let kinds: Vec<(&str, Counts)> =
            stats.by_kind.iter().map(|k| (k.kind.as_str(), k.counts)).collect();
        assert_eq!(
            kinds,
            [
                ("receive", Counts { live: 3, replays: 2, conflicts: 1 }),
                ("ship", Counts { live: 2, replays: 0, conflicts: 5 }),
            ]
        );
        assert_eq!(stats.by_user.len(), 3);
    }

    #[test]
    fn json_flattens_counts() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["by_kind_and_user"][0]["kind"], "receive");
        assert_eq!(json["by_kind_and_user"][0]["replays"], 2);
        assert_eq!(json["by_user"][2]["user"], "carol");
        assert_eq!(json["by_user"][2]["conflicts"], 5);
        assert_eq!(json["since"], serde_json::Value::Null);
    }

    #[test]
    fn prometheus_text() {
        let text = to_prometheus(&sample());
        assert!(text.contains("# TYPE wms_keys_live gauge\nwms_keys_live 5\n"), "{text}");
        assert!(text.contains("\nwms_keys_expired 4\n"), "{text}");
        assert!(text.contains("\nwms_oldest_live_key_age_seconds 101.000\n"), "{text}");
        assert!(text.contains("# TYPE wms_key_replays_total counter\n"), "{text}");
        assert!(text.contains("\nwms_key_conflicts_total{kind=\"ship\",user=\"carol\"} 5\n"));
        assert!(text.ends_with('\n'));

        let windowed = KeyStats { since: Some(at(0)), ..sample() };
        assert!(to_prometheus(&windowed).contains("# TYPE wms_key_replays_total gauge\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let mut stats = sample();
        stats.by_kind_and_user[0].kind = "odd\"kind\n".into();
        let text = to_prometheus(&stats);
        assert!(text.contains("{kind=\"odd\\\"kind\\n\",user=\"alice\"} 2\n"), "{text}");
    }

    #[test]
    fn no_live_key_is_age_zero() {
        let stats = KeyStats::assemble(at(0), None, 0, Vec::new(), Vec::new());
        assert_eq!(stats.oldest_live_age(), None);
        let text = to_prometheus(&stats);
        assert!(text.contains("\nwms_oldest_live_key_age_seconds 0.000\n"), "{text}");
        assert!(text.contains("# TYPE wms_key_conflicts_total counter\n"), "{text}");
    }
}

//! The library against a model: random sequences of receipts, shipments, transfers,
//! adjustments, replays, conflicting reuse of keys, the passing of time and cleanup runs, on
//! each database, each step checked against a few lines of in-memory bookkeeping that state the
//! posting rule (SPEC §3) and the stock rules (SPEC §4) as plainly as possible. After every step
//! the outcome must be the model's and the stock must equal the ledger; at the end the stock
//! must be the model's.
//!
//! Also here: input that no command line can carry (NUL), refused by the library itself.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use idem_core::testing::TestDb;
use idem_core::{
    CleanupOptions, Error, IdemKey, Kind, Operator, Outcome, Posting, Request, StockFilter, Store,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use uuid::Uuid;

const USERS: [&str; 2] = ["ann", "ben"];
const SKUS: [&str; 2] = ["S1", "S2"];
const LOCATIONS: [&str; 3] = ["A", "B", "C"];
/// Lifetimes and clock steps on a coarse grid, so that postings often land exactly on the
/// instant a key expires, where live turns into free.
const TTL_MINUTES: [i64; 3] = [15, 30, 60];
const ADVANCE_MINUTES: [i64; 4] = [5, 10, 15, 30];

/// One thing that happens in the warehouse, or to its clock.
#[derive(Debug, Clone)]
enum Step {
    /// A posting under one of a few keys, so that keys are reused often.
    Post { user: usize, key: usize, request: Request, ttl_minutes: i64 },
    /// The same posting as an earlier step, sent again.
    Replay { earlier: usize },
    /// An earlier step's operator and key with a different quantity.
    Conflict { earlier: usize, extra: i64 },
    /// Time passes, so that keys expire.
    Advance { minutes: i64 },
    /// A cleanup run at the current time.
    Cleanup,
}

fn request() -> impl Strategy<Value = Request> {
    let sku = prop::sample::select(&SKUS[..]);
    let location = prop::sample::select(&LOCATIONS[..]);
    let qty = 1..=20i64;
    prop_oneof![
        3 => (sku.clone(), qty.clone(), location.clone())
            .prop_map(|(s, q, l)| Request::receive(s, q, l).unwrap()),
        2 => (sku.clone(), qty.clone(), location.clone())
            .prop_map(|(s, q, l)| Request::ship(s, q, l).unwrap()),
        2 => (sku.clone(), qty, location.clone(), location.clone())
            .prop_filter("a transfer moves between two places", |(_, _, a, b)| a != b)
            .prop_map(|(s, q, a, b)| Request::transfer(s, q, a, b).unwrap()),
        1 => (sku, (-10..=10i64).prop_filter("non-zero", |d| *d != 0), location)
            .prop_map(|(s, d, l)| Request::adjust(s, d, l, "count").unwrap()),
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        8 => (0..USERS.len(), 0..6usize, request(), prop::sample::select(&TTL_MINUTES[..])).prop_map(
            |(user, key, request, ttl_minutes)| Step::Post { user, key, request, ttl_minutes }
        ),
        2 => any::<usize>().prop_map(|earlier| Step::Replay { earlier }),
        1 => (any::<usize>(), 1..=5i64).prop_map(|(earlier, extra)| Step::Conflict { earlier, extra }),
        2 => prop::sample::select(&ADVANCE_MINUTES[..]).prop_map(|minutes| Step::Advance { minutes }),
        1 => Just(Step::Cleanup),
    ];
    prop::collection::vec(step, 1..40)
}

/// A key as the model remembers it.
#[derive(Debug, Clone)]
struct ModelKey {
    request: Request,
    expires_at: DateTime<Utc>,
    transaction: Uuid,
}

/// What the model says a posting must do.
#[derive(Debug, PartialEq)]
enum Expected {
    Applied { reused_expired_key: Option<Uuid> },
    Replayed { transaction: Uuid, expires_at: DateTime<Utc> },
    Conflict { original: Uuid },
    Rejected { location: String, on_hand: i64, requested: i64 },
}

#[derive(Debug)]
struct Model {
    now: DateTime<Utc>,
    stock: BTreeMap<(String, String), i64>,
    keys: HashMap<(String, String), ModelKey>,
    /// The newest transaction under each (operator, key): the ledger outlives the key.
    last_transaction: HashMap<(String, String), Uuid>,
}

impl Model {
    fn new() -> Model {
        Model {
            now: Utc.with_ymd_and_hms(2031, 3, 14, 6, 0, 0).single().unwrap(),
            stock: BTreeMap::new(),
            keys: HashMap::new(),
            last_transaction: HashMap::new(),
        }
    }

    fn expect(&self, posting: &Posting) -> Expected {
        let id = (posting.user.to_string(), posting.key.to_string());
        if let Some(live) = self.keys.get(&id).filter(|k| self.now < k.expires_at) {
            return if live.request == posting.request {
                Expected::Replayed { transaction: live.transaction, expires_at: live.expires_at }
            } else {
                Expected::Conflict { original: live.transaction }
            };
        }
        let mut stock = self.stock.clone();
        for (location, delta) in posting.request.movements() {
            let on_hand =
                stock.entry((posting.request.sku.clone(), location.to_owned())).or_default();
            if *on_hand + delta < 0 {
                return Expected::Rejected {
                    location: location.to_owned(),
                    on_hand: *on_hand,
                    requested: -delta,
                };
            }
            *on_hand += delta;
        }
        Expected::Applied { reused_expired_key: self.last_transaction.get(&id).copied() }
    }

    fn apply(&mut self, posting: &Posting, transaction: Uuid) {
        for (location, delta) in posting.request.movements() {
            *self.stock.entry((posting.request.sku.clone(), location.to_owned())).or_default() +=
                delta;
        }
        let id = (posting.user.to_string(), posting.key.to_string());
        let key = ModelKey {
            request: posting.request.clone(),
            expires_at: self.now + posting.ttl,
            transaction,
        };
        self.keys.insert(id.clone(), key);
        self.last_transaction.insert(id, transaction);
    }

    /// Forgets expired keys, as a cleanup run at `now` does; returns how many.
    fn clean_up(&mut self) -> u64 {
        let before = self.keys.len();
        let now = self.now;
        self.keys.retain(|_, k| now < k.expires_at);
        (before - self.keys.len()) as u64
    }
}

fn posting(user: usize, key: usize, request: Request, ttl_minutes: i64) -> Posting {
    Posting::new(
        Operator::parse(USERS[user]).unwrap(),
        IdemKey::parse(&format!("key-{key}")).unwrap(),
        request,
    )
    .ttl(TimeDelta::minutes(ttl_minutes))
    .unwrap()
}

/// Runs the steps against the store and the model side by side.
async fn follow_the_model(store: &Store, steps: &[Step]) {
    let mut model = Model::new();
    let mut sent: Vec<Posting> = Vec::new();
    let janitor = Operator::parse("janitor").unwrap();

    for (n, step) in steps.iter().enumerate() {
        let posting = match step {
            Step::Post { user, key, request, ttl_minutes } => {
                Some(posting(*user, *key, request.clone(), *ttl_minutes))
            }
            Step::Replay { earlier } if !sent.is_empty() => {
                Some(sent[earlier % sent.len()].clone())
            }
            Step::Conflict { earlier, extra } if !sent.is_empty() => {
                let mut changed = sent[earlier % sent.len()].clone();
                // Any other valid quantity: an adjustment may not become zero.
                let qty = changed.request.qty + extra;
                changed.request.qty = if qty == 0 { qty + 1 } else { qty };
                Some(changed)
            }
            Step::Replay { .. } | Step::Conflict { .. } => None,
            Step::Advance { minutes } => {
                model.now += TimeDelta::minutes(*minutes);
                None
            }
            Step::Cleanup => {
                let options = CleanupOptions { now: model.now, ..CleanupOptions::default() };
                let report = store.cleanup(&options, &janitor).await.unwrap();
                assert_eq!(report.removed, model.clean_up(), "step {n}: keys removed by cleanup");
                None
            }
        };

        if let Some(posting) = posting {
            let expected = model.expect(&posting);
            let actual = store.post_at(&posting, model.now).await;
            match (&expected, actual) {
                (Expected::Applied { reused_expired_key }, Ok(posted)) => {
                    assert_eq!(posted.outcome, Outcome::Applied, "step {n}: {step:?}");
                    assert_eq!(&posted.reused_expired_key, reused_expired_key, "step {n}");
                    assert_eq!(posted.expires_at, model.now + posting.ttl, "step {n}");
                    let t = &posted.transaction;
                    assert_eq!(
                        (t.kind, &t.sku, t.qty, &t.location, &t.to_location),
                        (
                            posting.request.kind,
                            &posting.request.sku,
                            posting.request.qty,
                            &posting.request.location,
                            &posting.request.to_location
                        ),
                        "step {n}"
                    );
                    model.apply(&posting, t.id);
                }
                (Expected::Replayed { transaction, expires_at }, Ok(posted)) => {
                    assert_eq!(posted.outcome, Outcome::Replayed, "step {n}: {step:?}");
                    assert_eq!(posted.transaction.id, *transaction, "step {n}");
                    assert_eq!(posted.expires_at, *expires_at, "step {n}");
                }
                (Expected::Conflict { original }, Err(Error::KeyConflict { original: o, .. })) => {
                    assert_eq!(o, *original, "step {n}");
                }
                (
                    Expected::Rejected { location, on_hand, requested },
                    Err(Error::InsufficientStock { location: l, on_hand: h, requested: r, .. }),
                ) => assert_eq!((&l, h, r), (location, *on_hand, *requested), "step {n}"),
                (expected, actual) => {
                    panic!("step {n}: {step:?}\nexpected {expected:?}\ngot {actual:?}")
                }
            }
            sent.push(posting);
        }

        let differences = store.verify_stock().await.unwrap();
        assert!(differences.is_empty(), "step {n}: stock differs from the ledger: {differences:?}");
    }

    let stock: BTreeMap<(String, String), i64> = store
        .stock(&StockFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.on_hand != 0)
        .map(|l| ((l.sku, l.location), l.on_hand))
        .collect();
    model.stock.retain(|_, on_hand| *on_hand != 0);
    assert_eq!(stock, model.stock, "final stock");
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    async fn fresh(self) -> Option<TestDb> {
        match self {
            Backend::Sqlite => Some(TestDb::sqlite().await),
            Backend::Postgres => TestDb::postgres().await,
        }
    }
}

/// Runs the model test with a fresh database for every case. The database is made inside the
/// runtime that uses it, since a pool's connections belong to the runtime that opened them.
fn check_against_the_model(backend: Backend) {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if runtime.block_on(backend.fresh()).is_none() {
        return;
    }
    // A few dozen sequences of up to 40 steps each keep the test to seconds on either database;
    // a failure is shrunk to the shortest sequence that still fails.
    let config = Config { cases: 24, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let outcome = runner.run(&steps(), |steps| {
        runtime.block_on(async {
            let db = backend.fresh().await.expect("the database was there a moment ago");
            follow_the_model(db.store(), &steps).await;
        });
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

#[test]
fn model_holds_on_sqlite() {
    check_against_the_model(Backend::Sqlite);
}

#[test]
fn model_holds_on_postgres() {
    check_against_the_model(Backend::Postgres);
}

/// NUL and other control characters cannot come through a command line, but a caller of the
/// library or a file can carry them: every field refuses them before the database is touched.
#[test]
fn nul_and_control_characters_are_refused_by_the_library() {
    let field = |err: Error| match err {
        Error::InvalidInput { field, .. } => field,
        other => panic!("expected invalid input, got {other:?}"),
    };
    assert_eq!(field(IdemKey::parse("a\0b").unwrap_err()), "key");
    assert_eq!(field(IdemKey::parse("a\u{1b}[2J").unwrap_err()), "key");
    assert_eq!(field(Operator::parse("ann\0").unwrap_err()), "user");
    assert_eq!(field(Request::receive("S\0", 1, "A").unwrap_err()), "sku");
    assert_eq!(field(Request::receive("S", 1, "A\0").unwrap_err()), "location");
    let with = |reference: &str| Request::receive("S", 1, "A").unwrap().with_reference(reference);
    assert_eq!(field(with("PO\0").unwrap_err()), "reference");
    assert_eq!(field(with("PO\u{7f}").unwrap_err()), "reference");
    let adjust = Request::new(Kind::Adjust, "S", 1, "A", None, None, Some("count\0"));
    assert_eq!(field(adjust.unwrap_err()), "reason");
}

//! Postings inside one long-lived process: `Store::post` in a loop against the hand-written sqlx
//! loop, and eight PostgreSQL clients posting at once against one, where the database should
//! group their commits.

use std::time::{Duration, Instant};

use idem_core::{IdemKey, Operator, Posting, Request, Store, StoreOptions};

use crate::baseline::{self, Loop, Receipt};
use crate::measure::{Samples, Side, sides};
use crate::report::{Check, Figure, Unit, Value};
use crate::{Bench, Db};

/// A fresh receipt through idem-core, as a service built on the library would post it.
pub fn posting(key: &str, sku: &str, location: &str) -> Posting {
    Posting::new(
        Operator::parse(baseline::USER).expect("a valid operator"),
        IdemKey::parse(key).expect("a valid key"),
        Request::receive(sku, 1, location).expect("a valid receipt"),
    )
}

pub async fn posting_rate(bench: &mut Bench) {
    for db in Db::BOTH {
        let url = bench.fresh_database(db, &format!("rate_{db}")).await;
        let store = Store::connect(&url, &StoreOptions::default()).await.expect("connecting");
        let mut handwritten = Loop::connect(db, &url).await;
        let block = bench.sizes.rate_block;
        let mut product = Samples::default();
        let mut hand = Samples::default();

        // Round 0 warms both sides up (statement caches, the server's buffers) and is not counted.
        for round in 0..=bench.sizes.rate_rounds {
            for side in sides(round) {
                let started = Instant::now();
                for i in 0..block {
                    let key = format!("rate-{round}-{side:?}-{i}");
                    let sku = format!("SKU-{:03}", i % 200);
                    match side {
                        Side::Product => {
                            store.post(&posting(&key, &sku, "BIN-1")).await.expect("posting");
                        }
                        Side::Baseline => {
                            let receipt = Receipt::new(&key, &sku, 1, "BIN-1");
                            assert!(handwritten.post(&receipt).await, "a fresh key is claimed");
                        }
                    }
                }
                if round > 0 {
                    let rate = block as f64 / started.elapsed().as_secs_f64();
                    match side {
                        Side::Product => product.push(rate),
                        Side::Baseline => hand.push(rate),
                    }
                }
            }
        }
        store.close().await;
        handwritten.close().await;

        let figure = Figure::compare(
            format!("posting_rate.{db}"),
            "postings in one process, one by one",
            Some(db.name()),
            Value::new("Store::post loop", Unit::PerSecond, &product),
            Value::new("sqlx loop", Unit::PerSecond, &hand),
        )
        .check(|f| Check::ratio_at_least(f.ratio(), 0.8));
        bench.record(figure);
        bench.drop_database(db, &url).await;
    }
}

/// Posts fresh receipts through `store` until `deadline`; returns how many were applied.
async fn post_until(store: Store, tag: String, deadline: Instant) -> usize {
    let mut posted = 0;
    while Instant::now() < deadline {
        let key = format!("{tag}-{posted}");
        let sku = format!("SKU-{:03}", posted % 100);
        store.post(&posting(&key, &sku, "BIN-1")).await.expect("posting");
        posted += 1;
    }
    store.close().await;
    posted
}

async fn clients_at_once(url: &str, clients: usize, round: usize, window: Duration) -> f64 {
    let options = StoreOptions { max_connections: 1, ..StoreOptions::default() };
    let mut stores = Vec::new();
    for _ in 0..clients {
        stores.push(Store::connect(url, &options).await.expect("connecting"));
    }
    let deadline = Instant::now() + window;
    let started = Instant::now();
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(client, store)| {
            let tag = format!("clients-{clients}-{round}-{client}");
            tokio::spawn(post_until(store, tag, deadline))
        })
        .collect();
    let mut posted = 0;
    for task in tasks {
        posted += task.await.expect("a posting client");
    }
    posted as f64 / started.elapsed().as_secs_f64()
}

pub async fn clients(bench: &mut Bench) {
    let db = Db::Postgres;
    let url = bench.fresh_database(db, "clients").await;
    let window = bench.sizes.clients_window;
    let mut eight = Samples::default();
    let mut one = Samples::default();
    clients_at_once(&url, 8, 0, window / 4).await;
    for round in 1..=bench.sizes.clients_rounds {
        for side in sides(round) {
            match side {
                Side::Product => eight.push(clients_at_once(&url, 8, round, window).await),
                Side::Baseline => one.push(clients_at_once(&url, 1, round, window).await),
            }
        }
    }
    let figure = Figure::compare(
        "clients.postgres",
        "8 clients posting one by one at once",
        Some(db.name()),
        Value::new("8 clients", Unit::PerSecond, &eight),
        Value::new("1 client", Unit::PerSecond, &one),
    )
    .check(|f| Check::ratio_at_least(f.ratio(), 3.0));
    bench.record(figure);
    bench.drop_database(db, &url).await;
}

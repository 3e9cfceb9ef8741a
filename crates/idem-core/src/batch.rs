//! Batch postings: many postings committed in one database transaction for speed, each still a
//! posting of its own. Every posting runs the ordinary posting rule inside a savepoint, so that a
//! rejected posting is undone alone while its neighbours stay, and a conflict keeps its audit
//! entry. Postings run in order, so two with the same key behave exactly as if they had been
//! posted one after another: the second is a replay or a conflict.
//!
//! The stores own the surrounding transaction (begin, commit, retry on contention); this module
//! owns what happens between begin and commit, written once for every database.

use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::posting::{self, Finish, Posted, Posting, WriteTx};

/// A savepoint around one posting of a batch, implemented once per database.
pub(crate) trait PostingSavepoint {
    /// Marks the point that [`undo`](Self::undo) returns to.
    async fn savepoint(&mut self) -> Result<()>;
    /// Keeps what the posting wrote, as part of the enclosing transaction.
    async fn release(&mut self) -> Result<()>;
    /// Discards what the posting wrote and forgets the savepoint.
    async fn undo(&mut self) -> Result<()>;
}

/// Runs every posting inside the caller's open transaction, each in its own savepoint, and
/// returns each one's outcome in order. An `Err` from this function (contention, a lost
/// connection, a database fault) means the caller must roll the whole batch back.
pub(crate) async fn post_each<T: WriteTx + PostingSavepoint>(
    tx: &mut T,
    postings: &[Posting],
    now: DateTime<Utc>,
) -> Result<Vec<Result<Posted>>> {
    let mut outcomes = Vec::with_capacity(postings.len());
    for posting in postings {
        // As in a single posting: fields set directly, without the constructors' checks, are
        // refused before anything is written. Only this posting is refused.
        if let Err(err) = posting.validate() {
            outcomes.push(Err(err));
            continue;
        }
        tx.savepoint().await?;
        let outcome = match posting::post_in(tx, posting, now).await? {
            Finish::Commit(result) => {
                tx.release().await?;
                result
            }
            Finish::Rollback(err) => {
                tx.undo().await?;
                Err(err)
            }
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// The savepoint statements, the same in SQLite and PostgreSQL. `ROLLBACK TO` keeps the
/// savepoint open, so it is released as well: a batch never piles up open savepoints.
pub(crate) const SAVEPOINT_SQL: &str = "SAVEPOINT posting";
pub(crate) const RELEASE_SQL: &str = "RELEASE SAVEPOINT posting";
pub(crate) const UNDO_SQL: &str = "ROLLBACK TO SAVEPOINT posting; RELEASE SAVEPOINT posting";

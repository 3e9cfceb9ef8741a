//! Batch postings on PostgreSQL: one READ COMMITTED transaction per batch, a savepoint per
//! posting (see [`crate::batch`]), and the whole batch retried on serialization failures and
//! deadlocks, which two batches claiming the same keys in different orders can cause.

use chrono::{DateTime, Utc};
use sqlx::Connection;

use super::{PgStore, PgWrite, commit_err, map_err};
use crate::batch::{self, PostingSavepoint, RELEASE_SQL, SAVEPOINT_SQL, UNDO_SQL};
use crate::error::Result;
use crate::posting::{Posted, Posting};
use crate::retry::Retry;

impl PgStore {
    #[tracing::instrument(skip_all, err(level = "debug"), fields(postings = postings.len()))]
    pub(crate) async fn post_batch(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Posted>>> {
        if postings.is_empty() {
            return Ok(Vec::new());
        }
        let mut retry = Retry::new(self.busy_budget);
        loop {
            match self.post_batch_once(postings, now).await {
                Err(err) => retry.pause(err).await?,
                done => return done,
            }
        }
    }

    async fn post_batch_once(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Posted>>> {
        let mut conn = self.pool.acquire().await.map_err(map_err("connecting"))?;
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(map_err("beginning a batch"))?;
        let outcomes = batch::post_each(&mut PgWrite(&mut tx), postings, now).await?;
        tx.commit().await.map_err(commit_err)?;
        tracing::debug!(postings = outcomes.len(), "batch committed");
        Ok(outcomes)
    }
}

impl PostingSavepoint for PgWrite<'_> {
    async fn savepoint(&mut self) -> Result<()> {
        sqlx::raw_sql(SAVEPOINT_SQL)
            .execute(&mut *self.0)
            .await
            .map_err(map_err("beginning a posting in a batch"))?;
        Ok(())
    }

    async fn release(&mut self) -> Result<()> {
        sqlx::raw_sql(RELEASE_SQL)
            .execute(&mut *self.0)
            .await
            .map_err(map_err("keeping a posting in a batch"))?;
        Ok(())
    }

    async fn undo(&mut self) -> Result<()> {
        sqlx::raw_sql(UNDO_SQL)
            .execute(&mut *self.0)
            .await
            .map_err(map_err("undoing a posting in a batch"))?;
        Ok(())
    }
}

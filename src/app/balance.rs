//! Charging and reading balances.
//!
//! Invariant: a balance equals the sum of its ledger and never exceeds the configured maximum;
//! a retried charge (same idempotency key) credits nothing more.
//!
//! Cancel safety: a charge is one transaction; a call dropped before its commit rolls back and
//! credits nothing.

use std::sync::Arc;

use sqlx::PgPool;

use super::{
    idempotency::{NextAction, next_action},
    rate_limit::{LimitedCall, UserRateLimit},
};
use crate::{
    domain::{IdempotencyKey, LedgerEntry, PageSize, PageToken, UserId, Won},
    error::AppError,
    store::postgres::{
        self as postgres, balances,
        idempotency::{self, Operation},
    },
};

pub struct ChargeCommand {
    pub user_id: UserId,
    pub amount: Won,
    pub idempotency_key: Option<IdempotencyKey>,
}

/// The balance flows.
pub struct Balances {
    pg: PgPool,
    /// A charge that would take a balance past this is refused.
    max_balance: Won,
    rate: Arc<UserRateLimit>,
}

impl Balances {
    pub fn new(pg: PgPool, max_balance: Won, rate: Arc<UserRateLimit>) -> Self {
        Self {
            pg,
            max_balance,
            rate,
        }
    }

    /// Credits the balance and writes the CHARGE entry; returns that entry (its `balance_after`
    /// is the new balance).
    pub async fn charge(&self, cmd: ChargeCommand) -> Result<LedgerEntry, AppError> {
        self.rate
            .admit(cmd.user_id, LimitedCall::ChargeBalance)
            .await?;
        let max = self.max_balance;
        let mut tx = self.pg.begin().await?;
        let key = cmd.idempotency_key.as_ref();
        match next_action(&mut tx, cmd.user_id, Operation::Charge, key, || {
            cmd.amount.get().to_string()
        })
        .await?
        {
            NextAction::Start => {}
            NextAction::ReturnSaved(history_id) => {
                return Ok(balances::ledger_entry(&mut *tx, history_id).await?);
            }
        }
        if cmd.amount > max {
            return Err(AppError::BalanceLimitExceeded { max });
        }
        let entry = balances::charge(&mut tx, cmd.user_id, cmd.amount, max)
            .await?
            .ok_or(AppError::BalanceLimitExceeded { max })?;
        if let Some(key) = &cmd.idempotency_key {
            idempotency::complete(&mut tx, cmd.user_id, Operation::Charge, key, entry.id).await?;
        }
        postgres::commit(tx).await?;
        Ok(entry)
    }

    pub async fn balance(&self, user_id: UserId) -> Result<Won, AppError> {
        Ok(balances::balance(&self.pg, user_id).await?)
    }

    pub async fn history(
        &self,
        user_id: UserId,
        page_size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<LedgerEntry>, Option<PageToken>), AppError> {
        Ok(balances::history_page(&self.pg, user_id, page_size, after).await?)
    }
}

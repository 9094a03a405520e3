//! Charging and reading balances.
//!
//! Invariant: a balance equals the sum of its ledger and never exceeds the configured maximum;
//! a retried charge (same idempotency key) credits nothing more.

use super::App;
use crate::{
    domain::{IdempotencyKey, LedgerEntry, PageSize, PageToken, UserId, Won},
    error::AppError,
    store::postgres::{
        balances,
        idempotency::{self, Claim, Operation},
    },
};

pub struct ChargeCommand {
    pub user_id: UserId,
    pub amount: Won,
    pub idempotency_key: Option<IdempotencyKey>,
}

impl App {
    /// Credits the balance and writes the CHARGE entry; returns that entry (its `balance_after`
    /// is the new balance).
    pub async fn charge_balance(&self, cmd: ChargeCommand) -> Result<LedgerEntry, AppError> {
        let max = self.settings().max_balance;
        if cmd.amount > max {
            return Err(AppError::BalanceLimitExceeded { max });
        }
        let mut tx = self.pg().begin().await?;
        if let Some(key) = &cmd.idempotency_key {
            let fingerprint = cmd.amount.get().to_string();
            match idempotency::claim(&mut tx, cmd.user_id, Operation::Charge, key, &fingerprint)
                .await?
            {
                Claim::Fresh => {}
                Claim::Replay(history_id) => {
                    return Ok(balances::ledger_entry(&mut *tx, history_id).await?);
                }
                Claim::Mismatch => return Err(AppError::IdempotencyKeyReused),
            }
        }
        let entry = balances::charge(&mut tx, cmd.user_id, cmd.amount, max)
            .await?
            .ok_or(AppError::BalanceLimitExceeded { max })?;
        if let Some(key) = &cmd.idempotency_key {
            idempotency::complete(&mut tx, cmd.user_id, Operation::Charge, key, entry.id).await?;
        }
        tx.commit().await?;
        Ok(entry)
    }

    pub async fn balance(&self, user_id: UserId) -> Result<Won, AppError> {
        Ok(balances::balance(self.pg(), user_id).await?)
    }

    pub async fn balance_history(
        &self,
        user_id: UserId,
        page_size: PageSize,
        after: Option<PageToken>,
    ) -> Result<(Vec<LedgerEntry>, Option<PageToken>), AppError> {
        Ok(balances::history_page(self.pg(), user_id, page_size, after).await?)
    }
}

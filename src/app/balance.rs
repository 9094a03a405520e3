//! Charging and reading balances.
//!
//! Invariant: a balance equals the sum of its ledger and never exceeds the configured maximum;
//! a retried charge (same idempotency key) credits nothing more.
//!
//! Charges are group-committed ([`super::group_commit`]) like payments: one transaction credits a
//! batch, in two statements and the commit ([`charge_batch`]), whatever the batch's size. The
//! idempotency key is claimed in the batch without waiting, which answers a replay or a reused key
//! (a key being claimed elsewhere, or twice in the batch, sends the charge to run alone, where its
//! claim waits). The first statement claims the keys and locks the callers' balances (ascending
//! user id, a new user's row opened at 0). Then the batch decides in Rust, charge by charge, in
//! queue order, as if each ran alone after the earlier ones: an amount past the maximum is refused,
//! and so is one that would take what the earlier charges of the batch left of the balance past it
//! (BALANCE_LIMIT_EXCEEDED, crediting nothing). A refused charge gives its key claim back. The
//! second statement credits each caller once, writes one ledger entry per accepted charge with its
//! own `balance_after`, and settles the keys; the batch commits before anyone hears OK. A batch of
//! one charge without a key (a lone caller, or batching off) is one statement instead, the upsert
//! with its ledger entry that charges were before batching: the two statements of a batch, each
//! planned afresh for one row, cost a lone charge about twice the CPU.
//!
//! Cancel safety, at each await of [`Balances::charge`]: the rate limit writes nothing. In the
//! batch's queue, a caller gone before its batch starts is left out. The batch runs in a task of
//! its own, so it commits or rolls back whatever its callers do: a charge whose caller left while
//! the batch waited for its locks is refused (nothing credited, its key given back); one whose
//! caller leaves after that (or at any point of the one-statement lone charge, which locks and
//! writes at once) is committed all the same, and a retry with its key replays it.

use std::{collections::HashMap, sync::Arc};

use sqlx::PgPool;

use super::{
    group_commit::{Callers, GroupCommit, Step, Turn, WriteBatches, left_in},
    idempotency::{Keyed, asked, call_keys, settled, step_of},
    rate_limit::{LimitedCall, UserRateLimit},
};
use crate::{
    domain::{IdempotencyKey, LedgerEntry, PageSize, PageToken, UserId, Won},
    error::AppError,
    store::{
        StoreError,
        postgres::{
            self as postgres, balances,
            charge_batch::{self, ChargeRecord, ChargeRequest},
        },
    },
};

pub struct ChargeCommand {
    pub user_id: UserId,
    pub amount: Won,
    pub idempotency_key: Option<IdempotencyKey>,
}

impl Keyed for ChargeCommand {
    fn user_id(&self) -> UserId {
        self.user_id
    }

    fn key(&self) -> Option<&IdempotencyKey> {
        self.idempotency_key.as_ref()
    }

    fn fingerprint(&self) -> String {
        self.amount.get().to_string()
    }
}

/// The balance flows.
pub struct Balances {
    pg: PgPool,
    charging: GroupCommit<ChargeCommand, Charged>,
    rate: Arc<UserRateLimit>,
}

impl Balances {
    /// `max_balance`: a charge that would take a balance past this is refused.
    /// `batches`: how charges are gathered into transactions ([`WriteBatches`]).
    pub fn new(
        pg: PgPool,
        max_balance: Won,
        batches: WriteBatches,
        rate: Arc<UserRateLimit>,
    ) -> Self {
        let batch = Arc::new(ChargeBatch {
            pg: pg.clone(),
            max: max_balance,
        });
        let charging = GroupCommit::start(
            "balances.charge_batch",
            batches,
            Arc::new(move |calls, alone, callers, turn| {
                Box::pin(batch.clone().run(calls, alone, callers, turn))
            }),
        );
        Self { pg, charging, rate }
    }

    /// Credits the balance and writes the CHARGE entry; returns that entry (its `balance_after`
    /// is the new balance).
    pub async fn charge(&self, cmd: ChargeCommand) -> Result<LedgerEntry, AppError> {
        self.rate
            .admit(cmd.user_id, LimitedCall::ChargeBalance)
            .await?;
        // The batch's claim answers a replay or a reused key (see Pay).
        let charged = match self.charging.submit(cmd).await? {
            Charged::Busy(cmd) => self.charging.alone(cmd).await?,
            charged => charged,
        };
        match charged {
            Charged::Answered(answer) => answer,
            Charged::Busy(_) => Err(AppError::internal("a lone charge found its key busy")),
        }
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

/// What a batch did with one charge.
enum Charged {
    /// Its answer: the entry made or replayed, or the refusal.
    Answered(Result<LedgerEntry, AppError>),
    /// Its key is being claimed by another transaction: it must run alone.
    Busy(ChargeCommand),
}

/// Credits a batch of charges in one transaction (the module docs say how).
struct ChargeBatch {
    pg: PgPool,
    max: Won,
}

impl ChargeBatch {
    async fn run(
        self: Arc<Self>,
        calls: Vec<ChargeCommand>,
        alone: bool,
        callers: Callers,
        turn: Turn,
    ) -> Vec<Charged> {
        let mut steps: Vec<Step> = calls.iter().map(|_| Step::Open).collect();
        let entries = match self
            .decide_and_commit(&calls, alone, &callers, turn, &mut steps)
            .await
        {
            Ok(entries) => entries,
            Err(e) => {
                return calls
                    .into_iter()
                    .map(|_| Charged::Answered(Err(AppError::from(&e))))
                    .collect();
            }
        };
        let mut entries: Vec<Option<LedgerEntry>> = entries.into_iter().map(Some).collect();
        let mut answers = Vec::with_capacity(calls.len());
        for (cmd, step) in calls.into_iter().zip(steps) {
            answers.push(match step {
                Step::Busy => Charged::Busy(cmd),
                Step::Replay(id) => Charged::Answered(
                    balances::ledger_entry(&self.pg, id)
                        .await
                        .map_err(AppError::from),
                ),
                Step::Refused(e) => Charged::Answered(Err(e)),
                Step::Done(i) => Charged::Answered(
                    entries
                        .get_mut(i)
                        .and_then(Option::take)
                        .ok_or_else(|| AppError::internal("a charge answered twice")),
                ),
                Step::Open => Charged::Answered(Err(AppError::internal("a charge left undecided"))),
            });
        }
        answers
    }

    /// Claims, locks, decides and writes; returns the ledger entries of the accepted charges
    /// (`Step::Done(i)`: the i-th), committed.
    async fn decide_and_commit(
        &self,
        calls: &[ChargeCommand],
        alone: bool,
        callers: &Callers,
        mut turn: Turn,
        steps: &mut [Step],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        if let [cmd] = calls
            && cmd.idempotency_key.is_none()
        {
            return self.charge_alone(cmd, steps).await;
        }
        let keys = call_keys(calls);
        let asked = asked(&keys, steps);
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        // Planned per execution, unlike the other write batches: with a kept plan (nested
        // loops only) a batch of 64 charges cost more CPU per call than planning it
        // (docs/BENCHMARKS.md), since its statements are cheap and its batches large.
        let mut tx = postgres::begin_keyed(&self.pg).await?;

        // 1. One statement: the keys claimed without waiting, then the callers' balances.
        let requests: Vec<ChargeRequest> = asked
            .iter()
            .map(|&i| ChargeRequest {
                user_id: calls[i].user_id,
                key: keys[i].key().map(|k| (k, keys[i].fingerprint())),
                creditable: calls[i].amount <= self.max,
            })
            .collect();
        let found = charge_batch::lock(&mut tx, &requests, alone).await?;
        let mut fresh = Vec::new();
        let mut balances: HashMap<UserId, Won> = HashMap::new();
        for (&i, found) in asked.iter().zip(found) {
            if let Some(claim) = found.claim {
                steps[i] = step_of(i, claim, &mut fresh);
            }
            if let Some(balance) = found.balance {
                balances.insert(calls[i].user_id, balance);
            }
        }
        let open: Vec<usize> = asked
            .into_iter()
            .filter(|&i| matches!(steps[i], Step::Open))
            .collect();

        // A charge whose caller left while the batch waited for those locks is left out.
        let open = left_in(&open, callers, steps);

        // 2. Charge by charge, as if alone, against the balances as the earlier ones left them.
        let mut records = Vec::new();
        for i in open {
            let cmd = &calls[i];
            steps[i] = match credit(cmd.amount, self.max, balances.get_mut(&cmd.user_id)) {
                Ok(balance_after) => {
                    records.push(ChargeRecord {
                        user_id: cmd.user_id,
                        amount: cmd.amount,
                        balance_after,
                    });
                    Step::Done(records.len() - 1)
                }
                Err(e) => Step::Refused(e),
            };
        }
        if records.is_empty() {
            // Nothing to credit: the rollback gives every claimed key back.
            tx.rollback().await?;
            return Ok(Vec::new());
        }

        // 3. One statement: the credits, the ledger, and the keys settled (a key's result named
        // by its record's index) or given back.
        let settled = settled(&keys, &fresh, steps, |n| n as i64);
        let entries = charge_batch::write(&mut tx, &records, &settled).await?;
        turn.committing();
        postgres::commit(tx).await?;
        Ok(entries)
    }
}

impl ChargeBatch {
    /// A batch of one charge without a key: the credit and its entry in one statement (the
    /// batch's two would each be planned for one row, which costs a lone call more CPU and
    /// latency than it saves).
    async fn charge_alone(
        &self,
        cmd: &ChargeCommand,
        steps: &mut [Step],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let refused = AppError::BalanceLimitExceeded { max: self.max };
        if cmd.amount > self.max {
            steps[0] = Step::Refused(refused);
            return Ok(Vec::new());
        }
        let mut tx = postgres::begin_batch(&self.pg).await?;
        let Some(entry) = balances::charge(&mut tx, cmd.user_id, cmd.amount, self.max).await?
        else {
            steps[0] = Step::Refused(refused);
            tx.rollback().await?;
            return Ok(Vec::new());
        };
        postgres::commit(tx).await?;
        steps[0] = Step::Done(0);
        Ok(vec![entry])
    }
}

/// One charge, decided as a lone charge is: an amount past `max` is refused; otherwise the
/// locked `balance` (what the earlier charges of the batch left of it) is credited unless that
/// would pass `max`. Returns the balance after.
fn credit(amount: Won, max: Won, balance: Option<&mut Won>) -> Result<Won, AppError> {
    let refused = AppError::BalanceLimitExceeded { max };
    if amount > max {
        return Err(refused);
    }
    let balance =
        balance.ok_or_else(|| AppError::internal("a creditable charge without its balance"))?;
    let after = balance
        .checked_add(amount)
        .filter(|after| *after <= max)
        .ok_or(refused)?;
    *balance = after;
    Ok(after)
}

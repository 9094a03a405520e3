//! The first step of every keyed call (ChargeBalance, PlaceOrder, Checkout, Pay, RefundOrder, and
//! the admin's AdjustStock, CreateProduct, CreateCoupon): claim the key, or learn that it already
//! has a result, before any shortcut, cache or check is consulted, so a retry of a success always
//! gets that success. A buyer's keys and the admin's are separate scopes ([`KeyScope`]);
//! RefundOrder's key is in its order's buyer's.
//!
//! The claim is a row inserted in the call's own transaction: a concurrent retry waits on it
//! until the first attempt commits (then replays its result) or rolls back (then starts
//! afresh), and a call abandoned by its caller rolls its claim back with everything else.

use std::collections::HashSet;

use sqlx::PgConnection;

use super::group_commit::Step;
use crate::{
    domain::{IdempotencyKey, KeyScope, UserId},
    error::AppError,
    store::postgres::idempotency::{self, BatchClaim, Claim, Operation},
};

/// What a keyed call does next (zero2prod's `NextAction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NextAction {
    /// No key, or its first use: do the work (and record its result under the key).
    Start,
    /// The same request already succeeded: answer with its result, the id stored under the key.
    ReturnSaved(i64),
}

/// Claims `key` for this request in `tx`. A key already used for a different request is
/// refused with IDEMPOTENCY_KEY_REUSED.
pub(super) async fn next_action(
    tx: &mut PgConnection,
    scope: impl Into<KeyScope>,
    operation: Operation,
    key: Option<&IdempotencyKey>,
    fingerprint: impl FnOnce() -> String,
) -> Result<NextAction, AppError> {
    let Some(key) = key else {
        return Ok(NextAction::Start);
    };
    match idempotency::claim(tx, scope, operation, key, &fingerprint()).await? {
        Claim::Fresh => Ok(NextAction::Start),
        Claim::Replay(id) => Ok(NextAction::ReturnSaved(id)),
        Claim::Mismatch => Err(AppError::IdempotencyKeyReused),
    }
}

/// A call that may carry an idempotency key.
pub(super) trait Keyed {
    fn user_id(&self) -> UserId;
    fn key(&self) -> Option<&IdempotencyKey>;
    /// What makes two requests "the same request" for a key.
    fn fingerprint(&self) -> String;
}

/// The result already stored under `call`'s key, if a committed call with the same request
/// used it; IDEMPOTENCY_KEY_REUSED if one with another request did. Read before a shortcut
/// (a sold-out product, a refund's checks) could refuse a retry of a success: a call that
/// joins a batch has its key claimed there, which answers the same.
pub(super) async fn saved_result(
    pg: &sqlx::PgPool,
    operation: Operation,
    call: &impl Keyed,
) -> Result<Option<i64>, AppError> {
    let Some(key) = call.key() else {
        return Ok(None);
    };
    match idempotency::lookup(pg, call.user_id(), operation, key, &call.fingerprint()).await? {
        Some(Claim::Replay(id)) => Ok(Some(id)),
        Some(Claim::Mismatch) => Err(AppError::IdempotencyKeyReused),
        Some(Claim::Fresh) | None => Ok(None),
    }
}

/// A batched call's key: its caller, the key (if any) and the request's fingerprint.
pub(super) struct CallKey<'a> {
    user_id: UserId,
    key: Option<&'a IdempotencyKey>,
    fingerprint: String,
}

pub(super) fn call_keys<C: Keyed>(calls: &[C]) -> Vec<CallKey<'_>> {
    calls
        .iter()
        .map(|c| CallKey {
            user_id: c.user_id(),
            key: c.key(),
            fingerprint: c.fingerprint(),
        })
        .collect()
}

/// Marks busy each call whose key an earlier call of the batch carries (it runs alone later)
/// and returns the calls still open, to put to the batch's first statement.
pub(super) fn asked(calls: &[CallKey<'_>], steps: &mut [Step]) -> Vec<usize> {
    let mut seen = HashSet::new();
    for (i, call) in calls.iter().enumerate() {
        if let Some(key) = call.key
            && !seen.insert((call.user_id, key.as_str()))
        {
            steps[i] = Step::Busy;
        }
    }
    (0..calls.len())
        .filter(|&i| matches!(steps[i], Step::Open))
        .collect()
}

/// The step of call `i` whose key was claimed as `claim`: still open (and then `fresh`, its
/// result to be recorded), a replay, refused (key reused) or busy (claimed elsewhere).
pub(super) fn step_of(i: usize, claim: BatchClaim, fresh: &mut Vec<usize>) -> Step {
    match claim {
        BatchClaim::Claimed(Claim::Fresh) => {
            fresh.push(i);
            Step::Open
        }
        BatchClaim::Claimed(Claim::Replay(id)) => Step::Replay(id),
        BatchClaim::Claimed(Claim::Mismatch) => Step::Refused(AppError::IdempotencyKeyReused),
        BatchClaim::Busy => Step::Busy,
    }
}

impl<'a> CallKey<'a> {
    pub fn key(&self) -> Option<&'a IdempotencyKey> {
        self.key
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// What a batch's write records: for each key claimed by the batch (`fresh`), its caller, the
/// key and the result (`result_of` the row index of its [`Step::Done`]; `None`: the key is
/// given back).
pub(super) fn settled<'a>(
    calls: &[CallKey<'a>],
    fresh: &[usize],
    steps: &[Step],
    result_of: impl Fn(usize) -> i64,
) -> Vec<(UserId, &'a IdempotencyKey, Option<i64>)> {
    fresh
        .iter()
        .filter_map(|&i| {
            let result = match steps[i] {
                Step::Done(n) => Some(result_of(n)),
                _ => None,
            };
            Some((calls[i].user_id, calls[i].key?, result))
        })
        .collect()
}

//! The first step of every keyed call (ChargeBalance, PlaceOrder, Checkout, Pay): claim the key, or
//! learn that it already has a result, before any shortcut, cache or check is consulted, so a
//! retry of a success always gets that success.
//!
//! The claim is a row inserted in the call's own transaction: a concurrent retry waits on it
//! until the first attempt commits (then replays its result) or rolls back (then starts
//! afresh), and a call abandoned by its caller rolls its claim back with everything else.

use sqlx::PgConnection;

use crate::{
    domain::{IdempotencyKey, UserId},
    error::AppError,
    store::postgres::idempotency::{self, Claim, Operation},
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
    user_id: UserId,
    operation: Operation,
    key: Option<&IdempotencyKey>,
    fingerprint: impl FnOnce() -> String,
) -> Result<NextAction, AppError> {
    let Some(key) = key else {
        return Ok(NextAction::Start);
    };
    match idempotency::claim(tx, user_id, operation, key, &fingerprint()).await? {
        Claim::Fresh => Ok(NextAction::Start),
        Claim::Replay(id) => Ok(NextAction::ReturnSaved(id)),
        Claim::Mismatch => Err(AppError::IdempotencyKeyReused),
    }
}

//! Users who already hold the coupon and ask for it again (double clicks, impatient retries):
//! the set-up that makes them holders, the judgement of each repeat's answer, and the checks.
//!
//! Guarantees: a holder's coupon id is the one the server gave at set-up (or, when that answer
//! was lost to a transport error, the one its retry was told about), so a repeat is judged
//! against the truth; a repeat answered anything but ALREADY_EXISTS/COUPON_ALREADY_ISSUED
//! naming that id (or an unknown outcome, or a rate limit) is a violation, and so is a seat
//! taken by a repeat.

use anyhow::{anyhow, bail};
use futures::{StreamExt, TryStreamExt, stream};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

use super::{
    connect::{Connections, describe, retry},
    judge::Check,
    seen::Problems,
    stats::{Class, Outcomes},
    users::UserSpace,
};
use ecommerce::proto::{IssueCouponRequest, coupon_service_client::CouponServiceClient};

/// The ErrorInfo reason of a repeat, and the metadata key naming the coupon the user holds.
pub const ALREADY_ISSUED: &str = "COUPON_ALREADY_ISSUED";
const USER_COUPON_ID: &str = "user_coupon_id";
/// A refusal that says nothing about the coupon: the per-user rate limit, when one is set.
const RATE_LIMITED: &str = "RATE_LIMITED";

/// A user holding the coupon, and the id of the coupon they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub user_id: i64,
    pub user_coupon_id: i64,
}

/// Issues the coupon to coupon users `0..holders`, `concurrency` at a time.
pub async fn make_holders(
    connections: &Connections,
    coupon_id: i64,
    users: UserSpace,
    holders: u64,
    concurrency: usize,
) -> anyhow::Result<Vec<Holder>> {
    stream::iter(0..holders)
        .map(|n| {
            let client = CouponServiceClient::new(connections.channel(n as usize));
            make_holder(client, users.coupon_user(n), coupon_id)
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await
}

async fn make_holder(
    client: CouponServiceClient<Channel>,
    user_id: i64,
    coupon_id: i64,
) -> anyhow::Result<Holder> {
    let answer = retry(|| {
        let mut client = client.clone();
        async move {
            client
                .issue_coupon(IssueCouponRequest { user_id, coupon_id })
                .await
        }
    })
    .await;
    let user_coupon_id = match answer {
        Ok(response) => response
            .user_coupon
            .map(|c| c.id)
            .ok_or_else(|| anyhow!("IssueCoupon for user {user_id}: no coupon"))?,
        // A retry after an answer lost in transit: the first call had won.
        Err(status) => match held_id(&status) {
            Some(id) => id,
            None => bail!(
                "making user {user_id} a holder of coupon {coupon_id}: {}",
                describe(&status)
            ),
        },
    };
    Ok(Holder {
        user_id,
        user_coupon_id,
    })
}

/// The coupon id an ALREADY_EXISTS/COUPON_ALREADY_ISSUED answer names.
fn held_id(status: &Status) -> Option<i64> {
    if status.code() != Code::AlreadyExists {
        return None;
    }
    let info = status.get_details_error_info()?;
    if info.reason != ALREADY_ISSUED {
        return None;
    }
    info.metadata.get(USER_COUPON_ID)?.parse().ok()
}

/// What is wrong with the answer to a holder's repeat, if anything.
pub fn judge_repeat<T>(holder: Holder, answer: &Result<T, Status>) -> Option<String> {
    let status = match answer {
        Ok(_) => {
            return Some(format!(
                "user {} holding coupon {} was issued another",
                holder.user_id, holder.user_coupon_id
            ));
        }
        Err(status) => status,
    };
    if Class::of(status.code()) == Class::Indeterminate {
        return None;
    }
    if status.code() == Code::ResourceExhausted
        && status
            .get_details_error_info()
            .is_some_and(|i| i.reason == RATE_LIMITED)
    {
        return None;
    }
    match held_id(status) {
        Some(id) if id == holder.user_coupon_id => None,
        Some(id) => Some(format!(
            "user {} holding coupon {} was told it holds {id}",
            holder.user_id, holder.user_coupon_id
        )),
        None => Some(format!(
            "user {} holding coupon {}: {}",
            holder.user_id,
            holder.user_coupon_id,
            describe(status)
        )),
    }
}

/// What the run saw of the holders and what the server says after it.
pub struct HolderFacts<'a> {
    pub holders: u64,
    /// The coupon's seats: one per holder and spares.
    pub stock: i64,
    /// Every repeat call.
    pub repeats: &'a Outcomes,
    pub wrong: &'a Problems,
    pub remaining: Option<i64>,
    /// Rows for the coupon in Postgres, when it was read.
    pub db_rows: Option<i64>,
}

pub fn checks(f: &HolderFacts) -> Vec<Check> {
    let holders = i64::try_from(f.holders).unwrap_or(i64::MAX);
    // A repeat of unknown outcome is the one kind that could have taken a seat unseen.
    let unsure = i64::try_from(f.repeats.of_class(Class::Indeterminate)).unwrap_or(i64::MAX);
    let mut checks = vec![Check::none(
        "every repeat by a holder is ALREADY_EXISTS/COUPON_ALREADY_ISSUED naming its own coupon",
        f.wrong,
        f.repeats.total(),
    )];
    checks.push(match f.remaining {
        Some(remaining) => Check::within(
            "GetCoupon.remaining_quantity == stock - holders (no repeat took a seat)",
            f.stock - holders - unsure,
            f.stock - holders,
            remaining,
        ),
        None => Check::failed(
            "GetCoupon.remaining_quantity == stock - holders (no repeat took a seat)",
            "could not read the coupon back",
        ),
    });
    if let Some(rows) = f.db_rows {
        checks.push(Check::within(
            "user_coupons rows == holders (Postgres)",
            holders,
            holders + unsure,
            rows,
        ));
    }
    checks
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    const HOLDER: Holder = Holder {
        user_id: 7,
        user_coupon_id: 70,
    };

    fn refusal(code: Code, reason: &str, id: Option<i64>) -> Result<(), Status> {
        let metadata: HashMap<String, String> = id
            .map(|id| (USER_COUPON_ID.to_string(), id.to_string()))
            .into_iter()
            .collect();
        let details = ErrorDetails::with_error_info(reason, "ecommerce", metadata);
        Err(Status::with_error_details(code, "refused", details))
    }

    #[test]
    fn only_the_holders_own_coupon_is_a_true_answer() {
        let right = refusal(Code::AlreadyExists, ALREADY_ISSUED, Some(70));
        assert_eq!(judge_repeat(HOLDER, &right), None);
        assert_eq!(held_id(right.as_ref().unwrap_err()), Some(70));
        let other = refusal(Code::AlreadyExists, ALREADY_ISSUED, Some(71));
        assert_eq!(
            judge_repeat(HOLDER, &other).as_deref(),
            Some("user 7 holding coupon 70 was told it holds 71")
        );
        let nameless = refusal(Code::AlreadyExists, ALREADY_ISSUED, None);
        assert!(judge_repeat(HOLDER, &nameless).is_some());
        let sold_out = refusal(Code::ResourceExhausted, "COUPON_SOLD_OUT", None);
        assert!(judge_repeat(HOLDER, &sold_out).is_some());
        assert!(judge_repeat(HOLDER, &Ok::<(), Status>(())).is_some());
    }

    #[test]
    fn unknown_outcomes_and_rate_limits_are_not_judged() {
        let lost: Result<(), Status> = Err(Status::unavailable("gone"));
        assert_eq!(judge_repeat(HOLDER, &lost), None);
        let limited = refusal(Code::ResourceExhausted, RATE_LIMITED, None);
        assert_eq!(judge_repeat(HOLDER, &limited), None);
    }

    #[test]
    fn a_seat_taken_by_a_repeat_fails_the_run() {
        let repeats = Outcomes::default();
        let wrong = Problems::default();
        let facts = |remaining| HolderFacts {
            holders: 10,
            stock: 20,
            repeats: &repeats,
            wrong: &wrong,
            remaining: Some(remaining),
            db_rows: Some(10),
        };
        assert!(checks(&facts(10)).iter().all(|c| c.passed));
        let taken = checks(&facts(9));
        assert!(!taken[1].passed, "{:?}", taken[1]);
    }
}

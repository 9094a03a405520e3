//! The holders this process knows to be settled: users whose coupon row it saw committed.
//!
//! Invariant: an entry is only ever made from a committed row (the win's insert returned, a
//! lookup in Postgres found it, or the gate carried its id, which it learns the same ways), and
//! nothing in the service deletes a user's coupon row, so an entry stays true for the life of
//! the process; it answers a holder's repeat call (COUPON_ALREADY_ISSUED with the row's id)
//! without Redis or Postgres, the answer the gate itself gives a holder first, before its
//! window and its seats. The memory is bounded: once [`CAPACITY`] entries are held it starts
//! again empty, and a forgotten holder is answered by the gate as before.

use std::{collections::HashMap, sync::Mutex};

use crate::domain::{CouponId, UserCouponId, UserId};

/// Holders remembered at most (about 48 bytes each with the map's overhead).
pub(super) const CAPACITY: usize = 1 << 20;

#[derive(Default)]
pub(super) struct SettledHolders {
    ids: Mutex<HashMap<(CouponId, UserId), UserCouponId>>,
}

impl SettledHolders {
    pub(super) fn get(&self, coupon: CouponId, user: UserId) -> Option<UserCouponId> {
        let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.get(&(coupon, user)).copied()
    }

    /// `id` is the id of `user`'s committed row for `coupon`.
    pub(super) fn settled(&self, coupon: CouponId, user: UserId, id: UserCouponId) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.len() >= CAPACITY && !ids.contains_key(&(coupon, user)) {
            ids.clear();
        }
        ids.insert((coupon, user), id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(coupon: i64, user: i64, id: i64) -> (CouponId, UserId, UserCouponId) {
        (
            CouponId::parse(coupon, "coupon_id").unwrap(),
            UserId::parse(user, "user_id").unwrap(),
            UserCouponId::parse(id, "user_coupon_id").unwrap(),
        )
    }

    #[test]
    fn a_holder_is_known_per_coupon() {
        let holders = SettledHolders::default();
        let (coupon, user, id) = ids(1, 7, 70);
        let (other_coupon, other_user, _) = ids(2, 8, 1);
        assert_eq!(holders.get(coupon, user), None);
        holders.settled(coupon, user, id);
        assert_eq!(holders.get(coupon, user), Some(id));
        assert_eq!(holders.get(other_coupon, user), None);
        assert_eq!(holders.get(coupon, other_user), None);
    }

    #[test]
    fn a_full_memory_starts_again_empty() {
        let holders = SettledHolders::default();
        for user in 1..=CAPACITY as i64 {
            let (coupon, user, id) = ids(1, user, user);
            holders.settled(coupon, user, id);
        }
        let (coupon, first, id) = ids(1, 1, 1);
        // A holder known again is no new entry.
        holders.settled(coupon, first, id);
        assert_eq!(holders.get(coupon, first), Some(id));
        let (_, next, next_id) = ids(1, CAPACITY as i64 + 1, 9);
        holders.settled(coupon, next, next_id);
        assert_eq!(holders.get(coupon, next), Some(next_id));
        assert_eq!(holders.get(coupon, first), None);
    }
}

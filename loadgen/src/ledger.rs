//! What the load generator itself knows about the balances it touched: each user's balance
//! before the run, every credit the server confirmed (by ledger entry id, so a replayed
//! idempotency key that returns the same entry counts once), every refund it confirmed (by
//! refund id, likewise), every payment it confirmed, and the
//! calls whose effect is unknown. From that it derives the range the server's balance must lie
//! in; with no unknown calls the range is a single value.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Account {
    baseline: i64,
    /// Confirmed credits by ledger entry id.
    credits: BTreeMap<i64, i64>,
    /// Idempotency keys of confirmed credits: an unknown call with one of these keys is known
    /// after all (its entry is among `credits`).
    credited_keys: BTreeSet<String>,
    /// Confirmed refunds by refund id.
    refunds: BTreeMap<i64, i64>,
    debits: i64,
    /// Charges whose effect is unknown, with their idempotency key if they had one.
    unsure_credits: Vec<(Option<String>, i64)>,
    unsure_debits: i64,
}

/// Balances the run can vouch for, user by user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalanceBook {
    accounts: BTreeMap<i64, Account>,
}

impl BalanceBook {
    /// The user's balance before the run touched it.
    pub fn open(&mut self, user: i64, baseline: i64) {
        self.accounts.entry(user).or_default().baseline = baseline;
    }

    /// A charge the server confirmed with ledger entry `history_id`.
    pub fn credit(&mut self, user: i64, history_id: i64, amount: i64, key: Option<&str>) {
        let account = self.accounts.entry(user).or_default();
        account.credits.insert(history_id, amount);
        if let Some(key) = key {
            account.credited_keys.insert(key.to_string());
        }
    }

    /// A refund the server confirmed as refund `refund_id`, made with idempotency key `key`.
    pub fn refund(&mut self, user: i64, refund_id: i64, amount: i64, key: &str) {
        let account = self.accounts.entry(user).or_default();
        account.refunds.insert(refund_id, amount);
        account.credited_keys.insert(key.to_string());
    }

    /// A charge (or a keyed refund) that may or may not have happened.
    pub fn unsure_credit(&mut self, user: i64, amount: i64, key: Option<String>) {
        self.accounts
            .entry(user)
            .or_default()
            .unsure_credits
            .push((key, amount));
    }

    /// A payment the server confirmed.
    pub fn debit(&mut self, user: i64, amount: i64) {
        self.accounts.entry(user).or_default().debits += amount;
    }

    /// A payment that may or may not have happened.
    pub fn unsure_debit(&mut self, user: i64, amount: i64) {
        self.accounts.entry(user).or_default().unsure_debits += amount;
    }

    pub fn merge(&mut self, other: BalanceBook) {
        for (user, theirs) in other.accounts {
            let ours = self.accounts.entry(user).or_default();
            // Only the set-up book opens accounts; a worker's baseline is 0.
            ours.baseline += theirs.baseline;
            ours.credits.extend(theirs.credits);
            ours.credited_keys.extend(theirs.credited_keys);
            ours.refunds.extend(theirs.refunds);
            ours.debits += theirs.debits;
            ours.unsure_credits.extend(theirs.unsure_credits);
            ours.unsure_debits += theirs.unsure_debits;
        }
    }

    pub fn users(&self) -> impl Iterator<Item = i64> + '_ {
        self.accounts.keys().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// The lowest and highest balance the server may hold for `user` now.
    pub fn expected(&self, user: i64) -> Option<(i64, i64)> {
        let a = self.accounts.get(&user)?;
        let known = a.baseline + a.credits.values().sum::<i64>() + a.refunds.values().sum::<i64>()
            - a.debits;
        let unsure_credit: i64 = a
            .unsure_credits
            .iter()
            .filter(|(key, _)| key.as_ref().is_none_or(|k| !a.credited_keys.contains(k)))
            .map(|(_, amount)| amount)
            .sum();
        Some((known - a.unsure_debits, known + unsure_credit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_entry_counts_once() {
        let mut book = BalanceBook::default();
        book.open(7, 500);
        book.credit(7, 1, 1_000, Some("k1"));
        book.credit(7, 1, 1_000, Some("k1"));
        book.credit(7, 2, 300, None);
        book.debit(7, 200);
        assert_eq!(book.expected(7), Some((1_600, 1_600)));
        assert_eq!(book.expected(8), None);
    }

    #[test]
    fn a_refund_returned_twice_for_its_key_counts_once() {
        let mut book = BalanceBook::default();
        book.open(3, 0);
        book.credit(3, 1, 10_000, None);
        book.debit(3, 6_000);
        book.unsure_credit(3, 2_000, Some("r1".into()));
        book.refund(3, 40, 2_000, "r1");
        book.refund(3, 40, 2_000, "r1");
        assert_eq!(book.expected(3), Some((6_000, 6_000)));
    }

    #[test]
    fn unknown_calls_widen_the_range_until_resolved() {
        let mut book = BalanceBook::default();
        book.open(1, 0);
        book.unsure_credit(1, 100, None);
        book.unsure_credit(1, 50, Some("k".into()));
        book.unsure_debit(1, 30);
        assert_eq!(book.expected(1), Some((-30, 150)));
        // A later call with the same key answered: the credit is known now.
        book.credit(1, 9, 50, Some("k"));
        assert_eq!(book.expected(1), Some((20, 150)));
    }

    #[test]
    fn merging_worker_books_adds_up() {
        let mut setup = BalanceBook::default();
        setup.open(1, 10);
        setup.credit(1, 100, 5_000, Some("fund"));
        let mut w1 = BalanceBook::default();
        w1.debit(1, 1_000);
        w1.credit(2, 7, 40, None);
        let mut w2 = BalanceBook::default();
        w2.debit(1, 1_000);
        setup.merge(w1);
        setup.merge(w2);
        assert_eq!(setup.expected(1), Some((3_010, 3_010)));
        assert_eq!(setup.expected(2), Some((40, 40)));
        assert_eq!(setup.users().collect::<Vec<_>>(), vec![1, 2]);
    }
}

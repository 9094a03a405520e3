//! How much of what an order paid each refunded unit gives back.
//!
//! Invariant: the refunds of an order never give back more than its final amount, give back
//! exactly that amount once every unit is refunded, and each refunded line is within 1 won of its
//! exact share. The rule (the README states it for callers):
//! 1. *Lines.* The final amount `F` is shared among the lines in proportion to their totals
//!    `t = unit_price × quantity` (`T = Σ t`, the order's total): each line gets
//!    `floor(t × F / T)`, and the won left over (fewer than there are lines) go one each to the
//!    lines with the largest remainders `t × F mod T`, ties to the lower product id. The shares
//!    add up to `F`, and each is within 1 won of its exact share `t × F / T`.
//! 2. *Units.* The first `u` units of a line have paid `A(u) = floor((u × unit_price × F + c) / T)`,
//!    where `c` is 0 for a line rounded down and `T − (t × F mod T)` for a line rounded up, so
//!    that `A(quantity)` is the line's share. Refunding units `k+1..=m` gives back
//!    `A(m) − A(k)`: a line's refunds add up to its share however its units are split, and each
//!    is within 1 won of its exact share `(m − k) × unit_price × F / T` (both terms are floors
//!    of the same line's running sum, so their rounding errors lie on the same side and differ by
//!    less than 1).

use super::{RefundSelection, RefundedLine};
use crate::domain::{OrderItem, ProductId, Won};

/// One line's part of what the order paid (rule 1), and how it splits over its units (rule 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LineShare {
    product_id: ProductId,
    unit_price: i128,
    quantity: i32,
    share: i128,
    /// `c` of rule 2.
    offset: i128,
}

/// The order's final amount shared among its lines (the module docs state the rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// `T`: the order's total.
    total: i128,
    /// `F`: what the order paid.
    paid: i128,
    lines: Vec<LineShare>,
}

impl Allocation {
    /// `items`: the order's lines, each product once. `None` when they cannot be an order's
    /// (a negative price, a quantity below 1, a final amount outside `0..=total`).
    pub fn new(items: &[OrderItem], final_amount: Won) -> Option<Self> {
        let paid = i128::from(final_amount.get());
        let mut total = 0_i128;
        for item in items {
            if item.unit_price < Won::ZERO || item.quantity < 1 {
                return None;
            }
            total += i128::from(item.unit_price.get()) * i128::from(item.quantity);
        }
        if paid < 0 || paid > total {
            return None;
        }
        let mut lines: Vec<(LineShare, i128)> = items
            .iter()
            .map(|item| {
                let line_total = i128::from(item.unit_price.get()) * i128::from(item.quantity);
                let (share, remainder) = if total == 0 {
                    (0, 0)
                } else {
                    (line_total * paid / total, line_total * paid % total)
                };
                let line = LineShare {
                    product_id: item.product_id,
                    unit_price: i128::from(item.unit_price.get()),
                    quantity: item.quantity,
                    share,
                    offset: 0,
                };
                (line, remainder)
            })
            .collect();
        let floors: i128 = lines.iter().map(|(l, _)| l.share).sum();
        let left_over = usize::try_from(paid - floors).ok()?;
        // Largest remainder first, ties to the lower product id. The remainders add up to
        // `left_over × T` and each is below `T`, so every line that gets a won has a remainder.
        let mut by_remainder: Vec<usize> = (0..lines.len()).collect();
        by_remainder.sort_by(|&a, &b| {
            let ((la, ra), (lb, rb)) = (&lines[a], &lines[b]);
            rb.cmp(ra).then(la.product_id.cmp(&lb.product_id))
        });
        for &i in by_remainder.iter().take(left_over) {
            let (line, remainder) = &mut lines[i];
            line.share += 1;
            line.offset = total - *remainder;
        }
        Some(Self {
            total,
            paid,
            lines: lines.into_iter().map(|(l, _)| l).collect(),
        })
    }

    fn line(&self, product: ProductId) -> Option<&LineShare> {
        self.lines.iter().find(|l| l.product_id == product)
    }

    /// What units `after + 1 ..= after + n` of `product`'s line paid (rule 2). `None` for a
    /// product not in the order or units beyond the line.
    pub fn units(&self, product: ProductId, after: i32, n: i32) -> Option<Won> {
        let line = self.line(product)?;
        let to = after.checked_add(n)?;
        if after < 0 || n < 0 || to > line.quantity {
            return None;
        }
        Some(won(self.paid_for(line, to) - self.paid_for(line, after)))
    }

    /// `A(u)` of rule 2: what the first `units` units of `line` paid.
    fn paid_for(&self, line: &LineShare, units: i32) -> i128 {
        if units == line.quantity {
            return line.share;
        }
        if self.total == 0 {
            return 0;
        }
        (i128::from(units) * line.unit_price * self.paid + line.offset) / self.total
    }
}

/// Shares never exceed the order's final amount, an `i64`.
fn won(amount: i128) -> Won {
    Won::new(i64::try_from(amount).unwrap_or(i64::MAX))
}
/// Why a refund cannot be made as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundRefusal {
    /// The product is not a line of the order.
    NotInOrder(ProductId),
    /// More units than are left to refund of the line.
    ExceedsRemaining { product: ProductId, remaining: i32 },
    /// Every unit is refunded already.
    NothingLeft,
    /// The order's rows cannot be an order's (see [`Allocation::new`]).
    Inconsistent,
}

/// A refund decided against the order as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundPlan {
    /// By ascending product id.
    pub lines: Vec<RefundedLine>,
    pub amount: Won,
    /// Every unit of the order is refunded once this refund is made.
    pub completes: bool,
}

impl RefundPlan {
    /// `items` with their `refunded_quantity` as they are now; `final_amount` the order's.
    pub fn new(
        items: &[OrderItem],
        final_amount: Won,
        selection: &RefundSelection,
    ) -> Result<Self, RefundRefusal> {
        let allocation = Allocation::new(items, final_amount).ok_or(RefundRefusal::Inconsistent)?;
        let remaining = |item: &OrderItem| item.quantity - item.refunded_quantity;
        let mut wanted: Vec<(&OrderItem, i32)> = match selection {
            RefundSelection::Everything => items
                .iter()
                .filter(|i| remaining(i) > 0)
                .map(|i| (i, remaining(i)))
                .collect(),
            RefundSelection::Lines(lines) => lines
                .as_slice()
                .iter()
                .map(|line| {
                    let item = items
                        .iter()
                        .find(|i| i.product_id == line.product_id)
                        .ok_or(RefundRefusal::NotInOrder(line.product_id))?;
                    let n = line.quantity.get();
                    if n > remaining(item) {
                        return Err(RefundRefusal::ExceedsRemaining {
                            product: item.product_id,
                            remaining: remaining(item),
                        });
                    }
                    Ok((item, n))
                })
                .collect::<Result<_, _>>()?,
        };
        if wanted.is_empty() {
            return Err(RefundRefusal::NothingLeft);
        }
        wanted.sort_by_key(|(item, _)| item.product_id);
        let mut lines = Vec::with_capacity(wanted.len());
        let mut amount = Won::ZERO;
        for (item, n) in &wanted {
            let line_amount = allocation
                .units(item.product_id, item.refunded_quantity, *n)
                .ok_or(RefundRefusal::Inconsistent)?;
            amount = amount
                .checked_add(line_amount)
                .ok_or(RefundRefusal::Inconsistent)?;
            lines.push(RefundedLine {
                product_id: item.product_id,
                quantity: *n,
                amount: line_amount,
            });
        }
        let completes = items.iter().all(|item| {
            let now = wanted
                .iter()
                .find(|(i, _)| i.product_id == item.product_id)
                .map_or(0, |(_, n)| *n);
            item.refunded_quantity + now == item.quantity
        });
        Ok(Self {
            lines,
            amount,
            completes,
        })
    }
}
#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn product(id: i64) -> ProductId {
        ProductId::parse(id, "product_id").unwrap()
    }

    fn item(id: i64, price: i64, quantity: i32) -> OrderItem {
        OrderItem {
            product_id: product(id),
            name: format!("product {id}"),
            unit_price: Won::new(price),
            quantity,
            refunded_quantity: 0,
        }
    }

    fn shares(items: &[OrderItem], paid: i64) -> Vec<i64> {
        let allocation = Allocation::new(items, Won::new(paid)).unwrap();
        items
            .iter()
            .map(|i| allocation.units(i.product_id, 0, i.quantity).unwrap().get())
            .collect()
    }

    #[test]
    fn the_left_over_won_go_to_the_largest_remainders_then_the_lower_id() {
        // Three equal lines of 100 (T = 300) sharing 200: 66.67 each, two won left over, all
        // remainders equal: the two lowest ids get them.
        let items = [item(7, 100, 1), item(3, 50, 2), item(5, 25, 4)];
        assert_eq!(shares(&items, 200), vec![66, 67, 67]);
        // Remainders differ: 1000 and 2000 of T = 3000 sharing 1000 → 333.33 and 666.67.
        let items = [item(1, 1_000, 1), item(2, 1_000, 2)];
        assert_eq!(shares(&items, 1_000), vec![333, 667]);
        // No discount: every line keeps its total; all free: nothing to share.
        assert_eq!(shares(&items, 3_000), vec![1_000, 2_000]);
        assert_eq!(shares(&[item(1, 0, 3), item(2, 0, 1)], 0), vec![0, 0]);
        // A free line beside a paid one gets nothing.
        assert_eq!(shares(&[item(1, 0, 3), item(2, 999, 1)], 500), vec![0, 500]);
    }

    #[test]
    fn units_split_a_line_share_by_running_floors() {
        // One line of 3 units at 1,000, paid 2,000 of 3,000: 666.67 a unit.
        let items = [item(1, 1_000, 3)];
        let a = Allocation::new(&items, Won::new(2_000)).unwrap();
        let p = product(1);
        let one_by_one: Vec<i64> = (0..3).map(|k| a.units(p, k, 1).unwrap().get()).collect();
        assert_eq!(one_by_one.iter().sum::<i64>(), 2_000);
        assert!(
            one_by_one.iter().all(|&x| x == 666 || x == 667),
            "{one_by_one:?}"
        );
        assert_eq!(a.units(p, 0, 3), Some(Won::new(2_000)));
        assert_eq!(
            a.units(p, 1, 2).unwrap().get() + a.units(p, 0, 1).unwrap().get(),
            2_000
        );
        assert_eq!(a.units(p, 2, 2), None, "past the line");
        assert_eq!(a.units(product(9), 0, 1), None, "not a line");
    }

    #[test]
    fn impossible_orders_are_refused() {
        assert_eq!(Allocation::new(&[item(1, 100, 1)], Won::new(101)), None);
        assert_eq!(Allocation::new(&[item(1, 100, 1)], Won::new(-1)), None);
        assert_eq!(Allocation::new(&[item(1, -5, 1)], Won::ZERO), None);
        assert_eq!(Allocation::new(&[item(1, 5, 0)], Won::ZERO), None);
    }

    #[test]
    fn a_plan_refunds_what_is_asked_and_knows_when_it_completes() {
        let mut items = vec![item(1, 1_000, 2), item(2, 500, 4)];
        let everything = RefundSelection::Everything;
        let plan = RefundPlan::new(&items, Won::new(3_000), &everything).unwrap();
        assert_eq!(plan.amount, Won::new(3_000));
        assert!(plan.completes);
        assert_eq!(plan.lines.len(), 2);

        let some = RefundSelection::parse([(2, 3), (1, 1)].into_iter()).unwrap();
        let plan = RefundPlan::new(&items, Won::new(3_000), &some).unwrap();
        assert_eq!(
            plan.lines,
            vec![
                RefundedLine {
                    product_id: product(1),
                    quantity: 1,
                    amount: Won::new(750),
                },
                RefundedLine {
                    product_id: product(2),
                    quantity: 3,
                    amount: Won::new(1_125),
                },
            ]
        );
        assert!(!plan.completes);

        items[0].refunded_quantity = 2;
        items[1].refunded_quantity = 1;
        let too_many = RefundSelection::parse([(2, 4)].into_iter()).unwrap();
        assert_eq!(
            RefundPlan::new(&items, Won::new(3_000), &too_many),
            Err(RefundRefusal::ExceedsRemaining {
                product: product(2),
                remaining: 3
            })
        );
        let stranger = RefundSelection::parse([(3, 1)].into_iter()).unwrap();
        assert_eq!(
            RefundPlan::new(&items, Won::new(3_000), &stranger),
            Err(RefundRefusal::NotInOrder(product(3)))
        );
        let rest = RefundPlan::new(&items, Won::new(3_000), &everything).unwrap();
        assert_eq!(rest.lines.len(), 1);
        assert!(rest.completes);
        items[1].refunded_quantity = 4;
        assert_eq!(
            RefundPlan::new(&items, Won::new(3_000), &everything),
            Err(RefundRefusal::NothingLeft)
        );
    }

    /// An order (1..=50 lines, free lines and large prices included) with the discount a FIXED or
    /// PERCENT coupon could give, and a seed for the order in which its units are refunded.
    fn orders() -> impl Strategy<Value = (Vec<OrderItem>, i64, u64)> {
        let line = (
            prop_oneof![1 => Just(0_i64), 8 => 1..=200_000_i64, 1 => 1..=1_000_000_000_i64],
            1..=30_i32,
        );
        (
            prop::collection::vec(line, 1..=50),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(lines, discount_seed, order_seed)| {
                let items: Vec<OrderItem> = (1..)
                    .zip(lines)
                    .map(|(id, (price, quantity))| item(id, price, quantity))
                    .collect();
                let total: i64 = items
                    .iter()
                    .map(|i| i.unit_price.get() * i64::from(i.quantity))
                    .sum();
                let discount = if discount_seed % 2 == 0 {
                    // FIXED: min(amount, total).
                    i64::try_from(discount_seed % 300_000).unwrap().min(total)
                } else {
                    // PERCENT: floor(total × pct / 100), capped by some maximum.
                    let pct = i64::try_from(discount_seed % 100).unwrap() + 1;
                    let cap = i64::try_from(discount_seed / 100 % 500_000).unwrap();
                    let raw = total * pct / 100;
                    if cap > 0 { raw.min(cap) } else { raw }
                };
                (items, total - discount, order_seed)
            })
    }

    proptest! {
        #[test]
        fn random_partial_refunds_add_up_to_exactly_what_was_paid(
            (mut items, paid, seed) in orders()
        ) {
            let total: i128 = items
                .iter()
                .map(|i| i128::from(i.unit_price.get()) * i128::from(i.quantity))
                .sum();
            let mut state = seed | 1;
            let mut next = move |below: i32| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % below as u64) as i32
            };
            let mut refunded = 0_i64;
            let mut refunds = 0;
            loop {
                // A random handful of lines, random quantities of what is left; sometimes all.
                let left: Vec<(i64, i32)> = items
                    .iter()
                    .filter(|i| i.refunded_quantity < i.quantity)
                    .map(|i| (i.product_id.get(), i.quantity - i.refunded_quantity))
                    .collect();
                if left.is_empty() {
                    break;
                }
                let selection = if next(8) == 0 {
                    RefundSelection::Everything
                } else {
                    let mut picked = Vec::new();
                    for &(p, n) in &left {
                        if next(3) == 0 {
                            picked.push((p, 1 + next(n)));
                        }
                    }
                    let picked = if picked.is_empty() { vec![(left[0].0, 1)] } else { picked };
                    RefundSelection::parse(picked.into_iter()).unwrap()
                };
                let plan = RefundPlan::new(&items, Won::new(paid), &selection).unwrap();
                for line in &plan.lines {
                    let item = items.iter_mut().find(|i| i.product_id == line.product_id).unwrap();
                    // Within 1 won of the exact share n × price × F / T.
                    let exact = i128::from(line.quantity) * i128::from(item.unit_price.get())
                        * i128::from(paid);
                    let error = (i128::from(line.amount.get()) * total - exact).abs();
                    prop_assert!(total == 0 || error < total, "{line:?} off by {error}/{total}");
                    prop_assert!(line.amount >= Won::ZERO);
                    item.refunded_quantity += line.quantity;
                }
                refunded += plan.amount.get();
                refunds += 1;
                prop_assert!(refunded <= paid, "refunded {refunded} of {paid}");
                let done = items.iter().all(|i| i.refunded_quantity == i.quantity);
                prop_assert_eq!(plan.completes, done);
            }
            prop_assert_eq!(refunded, paid, "after {} refunds", refunds);
        }

        #[test]
        fn line_shares_add_up_and_stay_within_a_won((items, paid, _) in orders()) {
            let allocation = Allocation::new(&items, Won::new(paid)).unwrap();
            let total: i128 = items
                .iter()
                .map(|i| i128::from(i.unit_price.get()) * i128::from(i.quantity))
                .sum();
            let mut sum = 0;
            for i in &items {
                let share = allocation.units(i.product_id, 0, i.quantity).unwrap().get();
                let line_total = i128::from(i.unit_price.get()) * i128::from(i.quantity);
                let error = (i128::from(share) * total - line_total * i128::from(paid)).abs();
                prop_assert!(total == 0 || error < total);
                prop_assert!(i128::from(share) <= line_total);
                sum += share;
            }
            prop_assert_eq!(sum, paid);
        }
    }
}

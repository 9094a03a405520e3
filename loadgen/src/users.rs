//! Which user ids a run uses, and the seeds of its random streams.
//!
//! Guarantees: a run owns 2^32 consecutive user ids chosen from the seed among 2^30 disjoint
//! blocks, so runs with different seeds against the same deployment practically never share a
//! user (and hence a balance or a coupon holder). Within its block a run keeps the users it funds
//! or charges (the pool) apart from the users who only ask for a coupon.

/// SplitMix64: a fast, well-mixed bijection on u64, used to derive independent seeds.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of worker `index`'s random stream.
pub fn worker_seed(seed: u64, index: usize) -> u64 {
    splitmix64(seed ^ splitmix64(index as u64 ^ 0x5eed))
}

/// The user ids of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserSpace {
    base: i64,
}

impl UserSpace {
    const BLOCK_BITS: u32 = 32;
    const BLOCKS: u64 = 1 << 30;
    /// The first half of a block is the pool, the second half coupon-only users.
    const HALF: i64 = 1 << 31;
    /// Larger pools would spill into the coupon users' half.
    pub const MAX_POOL: u64 = (1 << 31) - 1;

    pub fn from_seed(seed: u64) -> Self {
        // Block 0 is skipped so that small ids, which people use by hand, are never touched;
        // the top block starts at 2^62, far below i64::MAX.
        let block = splitmix64(seed ^ 0x0005_e7ba_5e00) % Self::BLOCKS + 1;
        Self {
            base: (block << Self::BLOCK_BITS) as i64,
        }
    }

    pub fn base(self) -> i64 {
        self.base
    }

    /// The `i`-th user of the pool (funded buyers, charged users); `i < MAX_POOL`.
    pub fn pool_user(self, i: u64) -> i64 {
        self.base + 1 + (i % Self::MAX_POOL) as i64
    }

    /// The user who makes coupon request number `n`: a new user for every request (until 2^31
    /// requests, far beyond any run).
    pub fn coupon_user(self, n: u64) -> i64 {
        self.base + Self::HALF + (n % Self::HALF as u64) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_positive_disjoint_and_seed_dependent() {
        for seed in [0, 1, 42, u64::MAX] {
            let u = UserSpace::from_seed(seed);
            assert!(u.base() >= 1 << 32);
            assert!(u.pool_user(0) > u.base());
            assert!(u.pool_user(UserSpace::MAX_POOL - 1) < u.coupon_user(0));
            assert!(u.coupon_user(u64::MAX) > 0);
            assert!(u.coupon_user(u64::MAX) < u.base() + (1 << 32));
        }
        assert_ne!(UserSpace::from_seed(1), UserSpace::from_seed(2));
        assert_eq!(UserSpace::from_seed(7), UserSpace::from_seed(7));
        assert_ne!(worker_seed(1, 0), worker_seed(1, 1));
        assert_ne!(worker_seed(1, 0), worker_seed(2, 0));
    }
}

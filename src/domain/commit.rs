//! Which committed transactions a Postgres read saw: the ranking counts each payment exactly
//! once by comparing the payment's transaction id with the snapshot the last rebuild read.
//!
//! Invariant: a `Snapshot` is exactly what `pg_current_snapshot()::text` prints
//! (`xmin:xmax:xip,...`, decimal xid8 values) and a `TxId` what `pg_current_xact_id()::text`
//! prints, so the Lua scripts that judge visibility can trust the text they are given.
//!
//! A committed transaction `t` is visible in snapshot `s` iff `t < xmin`, or `t < xmax` and `t`
//! is not in `xip` (PostgreSQL's `pg_visible_in_snapshot`). The rule runs in Redis, in the
//! same step as the ranking's writes (`store/redis/lua/snapshot.lua`, tested in
//! tests/it/popular.rs against PostgreSQL's own answer).

use std::fmt;

/// A top-level transaction id (xid8: epoch and xid, never wraps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TxId(u64);

impl TxId {
    pub fn parse(text: &str) -> Option<Self> {
        decimal(text).map(Self)
    }
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An MVCC snapshot: which transactions had committed when a read began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, ':');
        let xmin = decimal(parts.next()?)?;
        let xmax = decimal(parts.next()?)?;
        let in_progress = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(decimal).collect::<Option<Vec<_>>>()?,
        };
        let sorted = in_progress.windows(2).all(|w| w[0] < w[1]);
        let within = in_progress.iter().all(|x| (xmin..xmax).contains(x));
        (xmin <= xmax && sorted && within).then_some(Self {
            xmin,
            xmax,
            in_progress,
        })
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.in_progress.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

/// Digits only, no sign, no leading zero: the Lua scripts compare these as strings (length,
/// then text), which is exact where Lua's doubles would not be above 2^53.
fn decimal(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_postgres_prints_and_nothing_else() {
        let s = Snapshot::parse("100:105:100,103").unwrap();
        assert_eq!(s.to_string(), "100:105:100,103");
        assert_eq!(Snapshot::parse("7:7:").unwrap().to_string(), "7:7:");
        for bad in [
            "", "1:2", "x:2:", "5:4:", "1:5:7", "1:5:3,2", "1:5:2,2", "01:5:", "1:5:,", "-1:5:",
        ] {
            assert_eq!(Snapshot::parse(bad), None, "{bad:?}");
        }
        assert_eq!(TxId::parse("18446744073709551615"), Some(TxId(u64::MAX)));
        assert_eq!(TxId::parse("007"), None);
        assert_eq!(TxId::parse("1e3"), None);
    }
}

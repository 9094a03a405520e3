//! Local calendar days of one IANA time zone (the ranking's day buckets).
//!
//! Invariant: day `d` is the half-open span of instants `[start(d), start(d + 1))`, where
//! `start(d)` is the first instant whose local date is `d`. The spans tile the time line with no
//! gap and no overlap, in every zone: where local midnight does not exist (a DST gap at 00:00,
//! as in America/Santiago, America/Havana and Asia/Beirut) the day starts at the transition,
//! when the clocks jump past midnight; where it happens twice (a DST overlap) it starts at the
//! first one. `day_of` is defined by the same spans, so the day a payment is counted in when it
//! is paid is the day a rebuild over `[start, end)` puts it in.

use chrono::{DateTime, Days, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// The days of one time zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calendar {
    tz: Tz,
}

/// No zone is this far from UTC (the extremes are about ±15 h, local mean time included), so
/// midnight minus this is surely the day before and midnight plus this surely the day itself or
/// later, wherever the zone's clocks are.
const FURTHEST_OFFSET_SECS: i64 = 26 * 3600;

impl Calendar {
    pub const fn new(tz: Tz) -> Self {
        Self { tz }
    }

    /// The first instant whose local date is `day`.
    pub fn start(&self, day: NaiveDate) -> DateTime<Utc> {
        let midnight = day.and_time(chrono::NaiveTime::MIN);
        match self.tz.from_local_datetime(&midnight) {
            LocalResult::Single(at) => at.with_timezone(&Utc),
            // Midnight shown twice: the day begins at the first.
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            // Midnight skipped: the day begins at the transition, the first instant whose local
            // time is past it. Found to the second by bisection (zone transitions fall on whole
            // seconds): before `lo` the local date is earlier, from `hi` on it is `day` or later.
            LocalResult::None => {
                let naive_utc = midnight.and_utc().timestamp();
                let (mut lo, mut hi) = (
                    naive_utc - FURTHEST_OFFSET_SECS,
                    naive_utc + FURTHEST_OFFSET_SECS,
                );
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if self.local_date(mid) >= day {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                DateTime::from_timestamp(hi, 0).expect("a day start within chrono's range")
            }
        }
    }

    /// The day whose span holds `at`.
    pub fn day_of(&self, at: DateTime<Utc>) -> NaiveDate {
        let local = at.with_timezone(&self.tz).date_naive();
        // An overlap that crosses midnight backwards shows the earlier date again after the
        // later day has begun; the spans, not the clock face, decide.
        match local.checked_add_days(Days::new(1)) {
            Some(next) if at >= self.start(next) => next,
            _ => local,
        }
    }

    /// The `days` days ending with the one holding `now`, oldest first, each with its start;
    /// and the end of the last (the start of the next day).
    pub fn window(&self, now: DateTime<Utc>, days: u32) -> DayWindow {
        let today = self.day_of(now);
        let first = today
            .checked_sub_days(Days::new(u64::from(days.max(1)) - 1))
            .unwrap_or(today);
        let days: Vec<(NaiveDate, DateTime<Utc>)> = first
            .iter_days()
            .take_while(|d| *d <= today)
            .map(|d| (d, self.start(d)))
            .collect();
        let end = today
            .succ_opt()
            .map_or(DateTime::<Utc>::MAX_UTC, |next| self.start(next));
        DayWindow { days, end }
    }

    fn local_date(&self, timestamp: i64) -> NaiveDate {
        DateTime::from_timestamp(timestamp, 0)
            .expect("within chrono's range")
            .with_timezone(&self.tz)
            .date_naive()
    }
}

/// Consecutive days, oldest first, each with its first instant, and the end of the last one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DayWindow {
    pub days: Vec<(NaiveDate, DateTime<Utc>)>,
    pub end: DateTime<Utc>,
}

impl DayWindow {
    /// The first instant of the window.
    pub fn start(&self) -> DateTime<Utc> {
        self.days.first().map_or(self.end, |(_, start)| *start)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use chrono_tz::{America, Asia};

    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// The invariant itself: the start's local date is the day, and the second before it is
    /// an earlier date.
    fn is_first_instant(tz: Tz, day: NaiveDate) {
        let start = Calendar::new(tz).start(day);
        assert_eq!(start.with_timezone(&tz).date_naive(), day, "{tz} {day}");
        let before = (start - Duration::seconds(1))
            .with_timezone(&tz)
            .date_naive();
        assert!(before < day, "{tz} {day}: {before} just before {start}");
    }

    #[test]
    fn a_day_without_midnight_starts_when_the_clocks_jump() {
        // Each zone moved its clocks from 00:00 straight to 01:00 on these days.
        for (tz, day, start) in [
            (America::Santiago, date(2024, 9, 8), "2024-09-08T04:00:00Z"),
            (America::Havana, date(2024, 3, 10), "2024-03-10T05:00:00Z"),
            (Asia::Beirut, date(2024, 3, 31), "2024-03-30T22:00:00Z"),
        ] {
            let calendar = Calendar::new(tz);
            assert_eq!(calendar.start(day), utc(start), "{tz} {day}");
            is_first_instant(tz, day);
            let local = calendar.start(day).with_timezone(&tz);
            assert_eq!(local.format("%H:%M").to_string(), "01:00", "{tz}");
        }
    }

    #[test]
    fn a_day_with_two_midnights_starts_at_the_first() {
        // Havana sets 01:00 back to 00:00: midnight happens at 04:00 and again at 05:00 UTC.
        let (tz, day) = (America::Havana, date(2024, 11, 3));
        let calendar = Calendar::new(tz);
        assert_eq!(calendar.start(day), utc("2024-11-03T04:00:00Z"));
        is_first_instant(tz, day);
        assert_eq!(calendar.day_of(utc("2024-11-03T05:30:00Z")), day);
        // Santiago and Beirut set 24:00 back to 23:00: the previous day is an hour longer.
        for (tz, day, start) in [
            (America::Santiago, date(2024, 4, 7), "2024-04-07T04:00:00Z"),
            (Asia::Beirut, date(2024, 10, 27), "2024-10-26T22:00:00Z"),
        ] {
            let calendar = Calendar::new(tz);
            assert_eq!(calendar.start(day), utc(start), "{tz}");
            is_first_instant(tz, day);
        }
    }

    #[test]
    fn days_tile_the_time_line_through_a_year_of_transitions() {
        for tz in [
            America::Santiago,
            America::Havana,
            Asia::Beirut,
            Asia::Seoul,
            chrono_tz::Australia::Lord_Howe,
            chrono_tz::Pacific::Apia,
        ] {
            let calendar = Calendar::new(tz);
            for day in date(2011, 1, 1).iter_days().take(3 * 366) {
                let (start, next) = (calendar.start(day), calendar.start(day.succ_opt().unwrap()));
                assert!(start <= next, "{tz} {day}");
                if start == next {
                    continue; // a skipped day (below)
                }
                assert_eq!(calendar.day_of(start), day, "{tz} {day}");
                assert_eq!(
                    calendar.day_of(next - Duration::seconds(1)),
                    day,
                    "{tz} {day}"
                );
            }
        }
    }

    #[test]
    fn a_skipped_day_has_no_span() {
        // Samoa skipped 30 December 2011 entirely: the 29th ends where the 31st begins.
        let calendar = Calendar::new(chrono_tz::Pacific::Apia);
        let (skipped, after) = (date(2011, 12, 30), date(2011, 12, 31));
        assert_eq!(calendar.start(skipped), calendar.start(after));
        assert_eq!(calendar.day_of(calendar.start(after)), after);
    }

    #[test]
    fn the_window_starts_at_its_first_day_even_when_that_day_has_no_midnight() {
        // 35 days, the last one 34 days after the gap: the gap day is the window's first day.
        for (tz, gap_day) in [
            (America::Santiago, date(2024, 9, 8)),
            (America::Havana, date(2024, 3, 10)),
            (Asia::Beirut, date(2024, 3, 31)),
        ] {
            let calendar = Calendar::new(tz);
            let today = gap_day + Days::new(34);
            let now = calendar.start(today) + Duration::hours(12);
            let window = calendar.window(now, 35);
            assert_eq!(window.days.len(), 35);
            assert_eq!(window.days[0], (gap_day, calendar.start(gap_day)), "{tz}");
            assert_eq!(window.start(), calendar.start(gap_day));
            assert!(window.start() < now - Duration::days(34), "{tz}: not 'now'");
            assert_eq!(window.end, calendar.start(today + Days::new(1)));
            let days: Vec<NaiveDate> = window.days.iter().map(|(d, _)| *d).collect();
            assert_eq!(days, gap_day.iter_days().take(35).collect::<Vec<_>>());
        }
    }
}

//! Reading variables through their table entries: each value is parsed and checked against the
//! entry's range, its default comes from the entry, and every problem is collected so the
//! operator sees them all at once.

use std::{fmt, str::FromStr, time::Duration};

use super::variables::{Default, Range, Variable};

pub(super) struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    pub(super) errors: Vec<String>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self {
            lookup,
            errors: Vec::new(),
        }
    }

    pub(super) fn error(&mut self, variable: &Variable, why: impl fmt::Display) {
        self.errors.push(format!("{}: {why}", variable.name));
    }

    /// The value as set, if it is.
    pub(super) fn set(&self, variable: &Variable) -> Option<String> {
        (self.lookup)(variable.name)
    }

    /// The value as set, or its default (empty for a variable without one).
    pub(super) fn text(&self, variable: &Variable) -> String {
        self.set(variable)
            .unwrap_or_else(|| match variable.default {
                Default::Value(value) => value.to_owned(),
                Default::Required | Default::Unset => String::new(),
            })
    }

    /// The value parsed as `T`. A bad value is reported and the default used instead.
    pub(super) fn parsed<T>(&mut self, variable: &Variable) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let raw = self.text(variable);
        match raw.trim().parse() {
            Ok(value) => {
                if let Range::OneOf(words) = variable.range
                    && !words.iter().any(|w| w.eq_ignore_ascii_case(raw.trim()))
                {
                    self.error(variable, format!("expected one of {}", variable.range));
                }
                value
            }
            Err(e) => {
                self.error(variable, format!("cannot parse {raw:?} ({e})"));
                default_of(variable)
            }
        }
    }

    /// A whole number within the variable's range.
    pub(super) fn integer<T>(&mut self, variable: &Variable) -> T
    where
        T: TryFrom<i64> + fmt::Display,
    {
        let value: i64 = self.parsed(variable);
        let (min, max) = bounds(variable);
        let value = if (min..=max).contains(&value) {
            value
        } else {
            self.error(variable, format!("{value} is outside {}", variable.range));
            default_of(variable)
        };
        T::try_from(value)
            .ok()
            .expect("every range fits the type its variable is read as")
    }

    /// A duration in the variable's unit (milliseconds or seconds), within its range.
    pub(super) fn duration(&mut self, variable: &Variable) -> Duration {
        let amount: u64 = self.integer(variable);
        match variable.range {
            Range::Millis { .. } => Duration::from_millis(amount),
            Range::Seconds { .. } => Duration::from_secs(amount),
            _ => unreachable!("{} is not a duration", variable.name),
        }
    }

    /// A number of hours (decimals allowed) within the variable's range.
    pub(super) fn hours(&mut self, variable: &Variable) -> Duration {
        let Range::Hours { max } = variable.range else {
            unreachable!("{} is not in hours", variable.name)
        };
        let hours: f64 = self.parsed(variable);
        if hours > 0.0 && hours <= max as f64 {
            Duration::from_secs_f64(hours * 3600.0)
        } else {
            self.error(variable, format!("{hours} is outside {}", variable.range));
            Duration::from_secs_f64(default_of::<f64>(variable) * 3600.0)
        }
    }
}

fn bounds(variable: &Variable) -> (i64, i64) {
    match variable.range {
        Range::Integer { min, max } => (min, max),
        Range::Millis { min, max } | Range::Seconds { min, max } => (min as i64, max as i64),
        _ => unreachable!("{} is not a number", variable.name),
    }
}

/// The variable's default, parsed; the table's own tests prove every default parses.
fn default_of<T: FromStr>(variable: &Variable) -> T {
    match variable.default {
        Default::Value(value) => value.parse().ok(),
        Default::Required | Default::Unset => "".parse().ok(),
    }
    .unwrap_or_else(|| panic!("the default of {} does not parse", variable.name))
}

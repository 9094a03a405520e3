//! Display names of products and coupons.

use super::ValidationError;

/// A product or coupon name: 1..=200 characters, not blank, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(raw: String, field: &'static str) -> Result<Self, ValidationError> {
        if raw.trim().is_empty() {
            return Err(ValidationError::new(field, "must not be blank"));
        }
        // Counting stops early, so a 1 MB string costs no more than 201 characters.
        if raw.chars().nth(Self::MAX_CHARS).is_some() {
            return Err(ValidationError::new(
                field,
                "must be at most 200 characters",
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(ValidationError::new(
                field,
                "must not contain control characters",
            ));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(DisplayName::parse("키보드".into(), "name").is_ok());
        assert!(DisplayName::parse("x".repeat(200), "name").is_ok());
        assert!(DisplayName::parse("한".repeat(200), "name").is_ok());
        assert!(DisplayName::parse("x".repeat(201), "name").is_err());
        assert!(DisplayName::parse("".into(), "name").is_err());
        assert!(DisplayName::parse("   ".into(), "name").is_err());
        assert!(DisplayName::parse("bad\u{0}name".into(), "name").is_err());
        assert!(DisplayName::parse("line\nbreak".into(), "name").is_err());
    }
}

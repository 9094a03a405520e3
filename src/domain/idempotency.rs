//! Idempotency keys: a retried call with the same key from the same user returns the first
//! result. The request's fingerprint is stored with the key so a different request reusing the
//! key is refused instead of silently answered with the wrong result.

use std::fmt;

use super::{UserId, ValidationError};

/// Whose keys a key is among: a buyer's (ChargeBalance, PlaceOrder, Checkout, Pay), or the
/// operator's (the AdminService calls that take a key). The same key string in two scopes is two
/// keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyScope {
    User(UserId),
    Admin,
}

impl KeyScope {
    /// How the scope is stored: the buyer's id, or 0 for the operator (ids are positive, so the
    /// two never meet; the schema ties scope 0 to the admin operations).
    pub fn stored_id(self) -> i64 {
        match self {
            KeyScope::User(user) => user.get(),
            KeyScope::Admin => 0,
        }
    }
}

impl From<UserId> for KeyScope {
    fn from(user: UserId) -> Self {
        KeyScope::User(user)
    }
}

impl fmt::Display for KeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyScope::User(user) => write!(f, "user {user}"),
            KeyScope::Admin => f.write_str("the admin"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 128;

    /// Empty means "no key". Otherwise 1..=128 printable ASCII characters.
    pub fn parse(raw: String) -> Result<Option<Self>, ValidationError> {
        if raw.is_empty() {
            return Ok(None);
        }
        if raw.len() > Self::MAX_LEN {
            return Err(ValidationError::new(
                "idempotency_key",
                "must be at most 128 characters",
            ));
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ValidationError::new(
                "idempotency_key",
                "must be printable ASCII without spaces",
            ));
        }
        Ok(Some(Self(raw)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_optional_bounded_and_printable() {
        assert_eq!(IdempotencyKey::parse(String::new()).unwrap(), None);
        assert!(
            IdempotencyKey::parse("order-123_ABC".into())
                .unwrap()
                .is_some()
        );
        assert!(IdempotencyKey::parse("k".repeat(128)).unwrap().is_some());
        assert!(IdempotencyKey::parse("k".repeat(129)).is_err());
        assert!(IdempotencyKey::parse("has space".into()).is_err());
        assert!(IdempotencyKey::parse("키".into()).is_err());
        assert!(IdempotencyKey::parse("nul\0".into()).is_err());
    }
}

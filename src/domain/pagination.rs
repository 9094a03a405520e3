//! Cursor pagination. A page token is an opaque, versioned encoding of the last id a page
//! returned; the next page starts after it, so inserts never cause gaps or repeats.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::ValidationError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSize(u16);

impl PageSize {
    pub const DEFAULT: u16 = 20;
    pub const MAX: u16 = 100;

    /// 0 means the default; otherwise 1..=[`Self::MAX`].
    pub fn parse(raw: i32) -> Result<Self, ValidationError> {
        match raw {
            0 => Ok(Self(Self::DEFAULT)),
            1.. if raw <= i32::from(Self::MAX) => Ok(Self(raw as u16)),
            _ => Err(ValidationError::new(
                "page_size",
                "must be between 1 and 100",
            )),
        }
    }

    pub fn get(self) -> i64 {
        i64::from(self.0)
    }
}

/// Where the next page starts: after the row with this key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageToken(i64);

impl PageToken {
    const VERSION: u8 = 1;

    pub fn after(last_key: i64) -> Self {
        Self(last_key)
    }

    pub fn last_key(self) -> i64 {
        self.0
    }

    /// An empty string is the first page.
    pub fn parse(raw: &str) -> Result<Option<Self>, ValidationError> {
        if raw.is_empty() {
            return Ok(None);
        }
        let invalid = || ValidationError::new("page_token", "is not a token this service issued");
        if raw.len() > 32 {
            return Err(invalid());
        }
        let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
        match bytes.as_slice() {
            [Self::VERSION, rest @ ..] if rest.len() == 8 => {
                let key = i64::from_be_bytes(rest.try_into().map_err(|_| invalid())?);
                Ok(Some(Self(key)))
            }
            _ => Err(invalid()),
        }
    }

    pub fn encode(self) -> String {
        let mut bytes = [0u8; 9];
        bytes[0] = Self::VERSION;
        bytes[1..].copy_from_slice(&self.0.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_defaults_and_bounds() {
        assert_eq!(PageSize::parse(0).unwrap().get(), 20);
        assert_eq!(PageSize::parse(1).unwrap().get(), 1);
        assert_eq!(PageSize::parse(100).unwrap().get(), 100);
        for bad in [-1, 101, i32::MAX, i32::MIN] {
            assert!(PageSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        for key in [1, 42, i64::MAX, i64::MIN] {
            let token = PageToken::after(key).encode();
            assert_eq!(
                PageToken::parse(&token).unwrap(),
                Some(PageToken::after(key))
            );
        }
        assert_eq!(PageToken::parse("").unwrap(), None);
        for bad in ["!!!", "AQ", "abc", &"A".repeat(1000), "AgAAAAAAAAAB"] {
            assert!(PageToken::parse(bad).is_err(), "{bad}");
        }
    }
}

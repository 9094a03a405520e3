//! Cursor pagination. A page token is an opaque, versioned encoding of the last key a page
//! returned: an id for lists by id ([`PageToken`]), a creation instant and an id for lists
//! newest first ([`CreatedCursor`]). The next page starts after it, so inserts never cause gaps
//! or repeats; a token of one kind is refused where the other is expected.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};

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
        Ok(decode_fields(raw, Self::VERSION)?.map(|[key]| Self(key)))
    }

    pub fn encode(self) -> String {
        encode_fields(Self::VERSION, &[self.0])
    }
}

/// Where the next page of a newest-first list starts: below this (created_at, id), in the
/// order (created_at DESC, id DESC). Instants keep Postgres's microseconds, so a row's own
/// instant round-trips exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreatedCursor {
    pub created_at: DateTime<Utc>,
    pub id: i64,
}

impl CreatedCursor {
    const VERSION: u8 = 2;
    /// The instants a token may name: those a `google.protobuf.Timestamp` can (years 1..=9999),
    /// which Postgres stores and binds without overflow.
    const MICROS: std::ops::RangeInclusive<i64> = -62_135_596_800_000_000..=253_402_300_799_999_999;

    pub fn below(created_at: DateTime<Utc>, id: i64) -> Self {
        Self { created_at, id }
    }

    /// An empty string is the first page.
    pub fn parse(raw: &str) -> Result<Option<Self>, ValidationError> {
        let Some([micros, id]) = decode_fields(raw, Self::VERSION)? else {
            return Ok(None);
        };
        let created_at = Some(micros)
            .filter(|m| Self::MICROS.contains(m))
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(invalid_token)?;
        Ok(Some(Self { created_at, id }))
    }

    pub fn encode(self) -> String {
        encode_fields(
            Self::VERSION,
            &[self.created_at.timestamp_micros(), self.id],
        )
    }
}

fn invalid_token() -> ValidationError {
    ValidationError::new("page_token", "is not a token this service issued")
}

/// The `N` big-endian i64 fields of a token of `version`; `None` for an empty token (the first
/// page).
fn decode_fields<const N: usize>(
    raw: &str,
    version: u8,
) -> Result<Option<[i64; N]>, ValidationError> {
    if raw.is_empty() {
        return Ok(None);
    }
    // The longest token issued is 23 characters; anything much longer is not one.
    if raw.len() > 32 {
        return Err(invalid_token());
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid_token())?;
    match bytes.split_first() {
        Some((&v, rest)) if v == version && rest.len() == 8 * N => {
            let mut fields = [0i64; N];
            for (field, chunk) in fields.iter_mut().zip(rest.chunks_exact(8)) {
                *field = i64::from_be_bytes(chunk.try_into().map_err(|_| invalid_token())?);
            }
            Ok(Some(fields))
        }
        _ => Err(invalid_token()),
    }
}

fn encode_fields(version: u8, fields: &[i64]) -> String {
    let mut bytes = Vec::with_capacity(1 + 8 * fields.len());
    bytes.push(version);
    for field in fields {
        bytes.extend_from_slice(&field.to_be_bytes());
    }
    URL_SAFE_NO_PAD.encode(bytes)
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

    #[test]
    fn created_cursors_round_trip_to_the_microsecond() {
        let at = DateTime::from_timestamp_micros(1_765_000_000_123_456).unwrap();
        for id in [1, 42, i64::MAX] {
            let cursor = CreatedCursor::below(at, id);
            assert_eq!(
                CreatedCursor::parse(&cursor.encode()).unwrap(),
                Some(cursor)
            );
        }
        let first = DateTime::from_timestamp(-62_135_596_800, 0).unwrap();
        let cursor = CreatedCursor::below(first, 1);
        assert_eq!(
            CreatedCursor::parse(&cursor.encode()).unwrap(),
            Some(cursor)
        );
        assert_eq!(CreatedCursor::parse("").unwrap(), None);
    }

    #[test]
    fn created_cursors_refuse_other_tokens_and_impossible_instants() {
        let id_token = PageToken::after(7).encode();
        assert!(CreatedCursor::parse(&id_token).is_err());
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert!(PageToken::parse(&CreatedCursor::below(at, 7).encode()).is_err());
        for micros in [i64::MAX, i64::MIN, 253_402_300_800_000_000] {
            let mut bytes = vec![2u8];
            bytes.extend_from_slice(&micros.to_be_bytes());
            bytes.extend_from_slice(&1i64.to_be_bytes());
            assert!(CreatedCursor::parse(&URL_SAFE_NO_PAD.encode(bytes)).is_err());
        }
        for bad in ["!!!", "Ag", "AgAAAAAAAAAB", &"A".repeat(33)] {
            assert!(CreatedCursor::parse(bad).is_err(), "{bad}");
        }
    }
}

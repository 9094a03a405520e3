//! Identifier newtypes: a `UserId` cannot be passed where a `ProductId` is expected, and none
//! can be zero or negative.

use std::fmt;

use super::ValidationError;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(i64);

        impl $name {
            /// Accepts only ids > 0; `field` names the request field in the error.
            pub fn parse(raw: i64, field: &'static str) -> Result<Self, ValidationError> {
                if raw > 0 {
                    Ok(Self(raw))
                } else {
                    Err(ValidationError::new(field, "must be a positive id"))
                }
            }

            pub const fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A shop user (owned by another service; known here by id only).
    UserId
);
id_type!(ProductId);
id_type!(
    /// A coupon definition (terms and stock).
    CouponId
);
id_type!(
    /// One coupon issued to one user.
    UserCouponId
);
id_type!(OrderId);
id_type!(PaymentId);
id_type!(
    /// One refund of (part of) a paid order.
    RefundId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_positive() {
        assert_eq!(UserId::parse(7, "user_id").unwrap().get(), 7);
        for raw in [0, -1, i64::MIN] {
            let err = UserId::parse(raw, "user_id").unwrap_err();
            assert_eq!(err.field, "user_id");
        }
        assert!(ProductId::parse(i64::MAX, "product_id").is_ok());
    }
}

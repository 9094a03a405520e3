use std::{borrow::Cow, fmt};

/// A request value that cannot become a domain value. `field` is the request field's name as the
/// caller sees it (for example `items[2].quantity`), so the error tells them what to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    pub field: Cow<'static, str>,
    pub message: Cow<'static, str>,
}

impl ValidationError {
    pub fn new(field: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ValidationError {}

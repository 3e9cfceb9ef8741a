//! Idempotency keys and operator names: types that can only hold a valid value, so that nothing
//! unchecked ever reaches a query.

use std::fmt;

use crate::error::{Error, Result};

/// The longest key accepted, in bytes (keys are ASCII, so also in characters).
pub const MAX_KEY_LEN: usize = 255;

/// An idempotency key: 1 to 255 printable ASCII characters, no spaces.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdemKey(String);

impl IdemKey {
    pub fn parse(raw: &str) -> Result<Self> {
        if raw.is_empty() {
            return Err(Error::invalid("key", "must not be empty"));
        }
        if raw.len() > MAX_KEY_LEN {
            return Err(Error::invalid(
                "key",
                format!("must be at most {MAX_KEY_LEN} characters, got {}", raw.chars().count()),
            ));
        }
        if let Some(bad) = raw.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(Error::invalid(
                "key",
                format!("must be printable ASCII without spaces, found {}", bad.escape_default()),
            ));
        }
        Ok(IdemKey(raw.to_owned()))
    }

    /// A fresh random key (a UUIDv4), for callers that have none of their own.
    pub fn generate() -> Self {
        IdemKey(uuid::Uuid::new_v4().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdemKey({:?})", self.0)
    }
}

/// The operator a key belongs to: keys are unique per operator, never across operators.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Operator(String);

impl Operator {
    /// 1 to 64 characters of ASCII letters, digits and `-_.@`.
    pub fn parse(raw: &str) -> Result<Self> {
        if raw.is_empty() || raw.len() > 64 {
            return Err(Error::invalid("user", "must be 1 to 64 characters"));
        }
        if let Some(bad) = raw.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.@".contains(*c)))
        {
            return Err(Error::invalid(
                "user",
                format!(
                    "may contain only ASCII letters, digits and -_.@, found {}",
                    bad.escape_default()
                ),
            ));
        }
        Ok(Operator(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Operator({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rules_name_the_field() {
        for bad in ["", "has space", "tab\there", "nul\0", "é", &"k".repeat(256)] {
            let err = IdemKey::parse(bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid key: "), "{bad:?}: {err}");
        }
        assert!(IdemKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdemKey::parse("order-17/line:3;'\"%\\").is_ok());
    }

    #[test]
    fn generated_keys_are_valid_and_distinct() {
        let a = IdemKey::generate();
        let b = IdemKey::generate();
        assert_ne!(a, b);
        assert_eq!(IdemKey::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn operator_rules() {
        assert!(Operator::parse("alice.b@site-2").is_ok());
        assert!(Operator::parse("").is_err());
        assert!(Operator::parse("bob smith").is_err());
        assert!(Operator::parse(&"a".repeat(65)).is_err());
    }
}

//! What an operator asks for: one validated request per kind, its canonical form, and the
//! SHA-256 fingerprint that tells a retry from a different request under the same key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The largest quantity (or absolute adjustment) one posting may carry.
pub const MAX_QTY: i64 = 1_000_000_000;
/// The longest SKU or location, in characters.
pub const MAX_IDENT_LEN: usize = 64;
/// The longest reference or reason, in characters.
pub const MAX_TEXT_LEN: usize = 500;

/// The four kinds of inventory transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Receive,
    Ship,
    Transfer,
    Adjust,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Receive, Kind::Ship, Kind::Transfer, Kind::Adjust];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Receive => "receive",
            Kind::Ship => "ship",
            Kind::Transfer => "transfer",
            Kind::Adjust => "adjust",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = Error;

    fn from_str(raw: &str) -> Result<Self> {
        Kind::ALL.into_iter().find(|k| k.as_str() == raw).ok_or_else(|| {
            Error::invalid(
                "kind",
                format!("must be receive, ship, transfer or adjust, got {raw:?}"),
            )
        })
    }
}

/// Checks a SKU or location: 1 to 64 ASCII letters, digits and `-_.:/`.
pub fn check_ident(field: &'static str, raw: &str) -> Result<()> {
    if raw.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if raw.chars().count() > MAX_IDENT_LEN {
        return Err(Error::invalid(field, format!("must be at most {MAX_IDENT_LEN} characters")));
    }
    if let Some(bad) = raw.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.:/".contains(*c))) {
        return Err(Error::invalid(
            field,
            format!(
                "may contain only ASCII letters, digits and -_.:/, found {:?}",
                bad.escape_default().to_string()
            ),
        ));
    }
    Ok(())
}

/// Checks a free-text reference or reason: at most 500 characters, no control characters.
/// Anything else, quotes and non-Latin scripts included, is stored verbatim.
pub fn check_text(field: &'static str, raw: &str) -> Result<()> {
    if raw.chars().count() > MAX_TEXT_LEN {
        return Err(Error::invalid(field, format!("must be at most {MAX_TEXT_LEN} characters")));
    }
    if let Some(bad) = raw.chars().find(|c| c.is_control() || is_bidi_control(*c)) {
        return Err(Error::invalid(
            field,
            format!(
                "must not contain control or text-direction characters, found {}",
                bad.escape_unicode()
            ),
        ));
    }
    Ok(())
}

/// Text-direction overrides can make a terminal show something other than what is stored.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn check_qty(field: &'static str, qty: i64, signed: bool) -> Result<()> {
    let ok = if signed { qty != 0 && qty.abs() <= MAX_QTY } else { (1..=MAX_QTY).contains(&qty) };
    if ok {
        Ok(())
    } else if signed {
        Err(Error::invalid(
            field,
            format!("must be a non-zero whole number between -{MAX_QTY} and {MAX_QTY}, got {qty}"),
        ))
    } else {
        Err(Error::invalid(field, format!("must be a whole number from 1 to {MAX_QTY}, got {qty}")))
    }
}

/// A validated request: the part of a posting that the fingerprint covers.
///
/// `qty` is positive for receipts, shipments and transfers and the signed delta for adjustments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub kind: Kind,
    pub sku: String,
    pub qty: i64,
    pub location: String,
    pub to_location: Option<String>,
    pub reference: Option<String>,
    pub reason: Option<String>,
}

impl Request {
    /// Builds and validates a request of any kind, as an import line or a form would supply it.
    pub fn new(
        kind: Kind,
        sku: &str,
        qty: i64,
        location: &str,
        to_location: Option<&str>,
        reference: Option<&str>,
        reason: Option<&str>,
    ) -> Result<Self> {
        check_ident("sku", sku)?;
        check_ident("location", location)?;
        let blank_to_none = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(str::to_owned);
        let to_location = blank_to_none(to_location);
        let reference = blank_to_none(reference);
        let reason = blank_to_none(reason);

        match kind {
            Kind::Adjust => check_qty("delta", qty, true)?,
            _ => check_qty("qty", qty, false)?,
        }
        match (kind, &to_location) {
            (Kind::Transfer, None) => {
                return Err(Error::invalid("to_location", "is required for a transfer"));
            }
            (Kind::Transfer, Some(to)) => {
                check_ident("to_location", to)?;
                if to == location {
                    return Err(Error::invalid(
                        "to_location",
                        "must differ from the source location",
                    ));
                }
            }
            (_, Some(_)) => {
                return Err(Error::invalid(
                    "to_location",
                    format!("is only allowed for a transfer, not a {kind}"),
                ));
            }
            (_, None) => {}
        }
        if let Some(reference) = &reference {
            check_text("reference", reference)?;
        }
        match (kind, &reason) {
            (Kind::Adjust, None) => {
                return Err(Error::invalid("reason", "is required for an adjustment"));
            }
            (_, Some(reason)) => check_text("reason", reason)?,
            (_, None) => {}
        }
        Ok(Request {
            kind,
            sku: sku.to_owned(),
            qty,
            location: location.to_owned(),
            to_location,
            reference,
            reason,
        })
    }

    pub fn receive(sku: &str, qty: i64, location: &str) -> Result<Self> {
        Request::new(Kind::Receive, sku, qty, location, None, None, None)
    }

    pub fn ship(sku: &str, qty: i64, location: &str) -> Result<Self> {
        Request::new(Kind::Ship, sku, qty, location, None, None, None)
    }

    pub fn transfer(sku: &str, qty: i64, from: &str, to: &str) -> Result<Self> {
        Request::new(Kind::Transfer, sku, qty, from, Some(to), None, None)
    }

    pub fn adjust(sku: &str, delta: i64, location: &str, reason: &str) -> Result<Self> {
        Request::new(Kind::Adjust, sku, delta, location, None, None, Some(reason))
    }

    /// Checks every rule again, for a request whose public fields were set directly rather than
    /// through [`Request::new`]; blank optional fields must be `None`, as `new` leaves them.
    pub fn validate(&self) -> Result<()> {
        let checked = Request::new(
            self.kind,
            &self.sku,
            self.qty,
            &self.location,
            self.to_location.as_deref(),
            self.reference.as_deref(),
            self.reason.as_deref(),
        )?;
        for (field, given, kept) in [
            ("to_location", &self.to_location, &checked.to_location),
            ("reference", &self.reference, &checked.reference),
            ("reason", &self.reason, &checked.reason),
        ] {
            if given != kept {
                return Err(Error::invalid(field, "must be absent rather than empty"));
            }
        }
        Ok(())
    }

    /// Adds a reference (an order or delivery number), validated like any other field.
    pub fn with_reference(mut self, reference: &str) -> Result<Self> {
        if !reference.is_empty() {
            check_text("reference", reference)?;
            self.reference = Some(reference.to_owned());
        }
        Ok(self)
    }

    /// The canonical form: JSON with a fixed field order and every field present, so that equal
    /// requests always serialize to the same bytes.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).expect("a request always serializes")
    }

    /// Hex SHA-256 of the canonical form.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.canonical())
    }

    /// The stock movements this request makes, as (location, signed delta).
    pub fn movements(&self) -> Vec<(&str, i64)> {
        match self.kind {
            Kind::Receive | Kind::Adjust => vec![(&self.location, self.qty)],
            Kind::Ship => vec![(&self.location, -self.qty)],
            Kind::Transfer => vec![
                (&self.location, -self.qty),
                (
                    self.to_location.as_deref().expect("validated transfer has a destination"),
                    self.qty,
                ),
            ],
        }
    }
}

/// Hex SHA-256 of a canonical request (of any shape, for callers of the generic claim).
pub fn fingerprint(canonical: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(canonical.as_bytes());
    // Every posting takes a fingerprint: written out without a `format!` for every byte.
    let mut hex = String::with_capacity(2 * digest.len());
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

/// The top-level fields whose values differ between two canonical forms, in name order.
pub fn differing_fields(stored: &str, incoming: &str) -> Vec<String> {
    use serde_json::{Map, Value};
    let parse = |s: &str| match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let (a, b) = (parse(stored), parse(incoming));
    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    let fields: Vec<String> =
        names.into_iter().filter(|n| a.get(*n) != b.get(*n)).cloned().collect();
    if fields.is_empty() { vec!["request".to_owned()] } else { fields }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_is_stable_and_excludes_nothing_of_the_request() {
        let r = Request::receive("SKU-1", 5, "A1").unwrap();
        assert_eq!(
            r.canonical(),
            r#"{"kind":"receive","sku":"SKU-1","qty":5,"location":"A1","to_location":null,"reference":null,"reason":null}"#
        );
        assert_eq!(r.fingerprint().len(), 64);
        assert_eq!(r.fingerprint(), Request::receive("SKU-1", 5, "A1").unwrap().fingerprint());
        assert_ne!(r.fingerprint(), Request::receive("SKU-1", 6, "A1").unwrap().fingerprint());
    }

    #[test]
    fn fingerprint_is_lowercase_hex_sha256() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(fingerprint("abc"), abc);
    }

    #[test]
    fn differing_fields_names_each_changed_field() {
        let a = Request::receive("S", 5, "A1").unwrap().canonical();
        let b = Request::receive("S", 6, "B1").unwrap().canonical();
        assert_eq!(differing_fields(&a, &b), ["location", "qty"]);
    }

    #[test]
    fn quantity_bounds() {
        for qty in [0, -1, MAX_QTY + 1] {
            let err = Request::receive("S", qty, "A").unwrap_err().to_string();
            assert!(err.starts_with("invalid qty: must be a whole number from 1"), "{err}");
        }
        assert!(Request::receive("S", MAX_QTY, "A").is_ok());
        assert!(Request::adjust("S", -MAX_QTY, "A", "count").is_ok());
        assert!(
            Request::adjust("S", 0, "A", "count")
                .unwrap_err()
                .to_string()
                .starts_with("invalid delta")
        );
    }

    #[test]
    fn identifiers_and_text() {
        assert!(
            Request::receive("a b", 1, "A").unwrap_err().to_string().starts_with("invalid sku")
        );
        assert!(
            Request::receive("S", 1, "A;drop")
                .unwrap_err()
                .to_string()
                .starts_with("invalid location")
        );
        assert!(Request::receive("Ѕ", 1, "A").is_err(), "Cyrillic look-alike refused");
        assert!(Request::receive(&"s".repeat(65), 1, "A").is_err());
        let r =
            Request::receive("S", 1, "A").unwrap().with_reference("PO 'x'; \"%\\ 東京").unwrap();
        assert_eq!(r.reference.as_deref(), Some("PO 'x'; \"%\\ 東京"));
        assert!(Request::receive("S", 1, "A").unwrap().with_reference("a\u{202e}b").is_err());
        assert!(Request::receive("S", 1, "A").unwrap().with_reference("a\0b").is_err());
        assert!(Request::transfer("S", 1, "A", "A").is_err());
        assert!(Request::new(Kind::Adjust, "S", 3, "A", None, None, None).is_err());
    }
}

//! JSON Lines records: one object per physical line, with the same field names as the CSV
//! columns. `null` is the same as an absent field; anything else of the wrong type is refused
//! with a message naming the field.

use serde_json::{Map, Value};

use super::{Column, Fields, Original};

/// Reads one line; what it says, and what a reject file should copy of it.
pub fn parse_line(text: &[u8]) -> (Result<Fields, String>, Original) {
    let Ok(text) = std::str::from_utf8(text) else {
        let lossy = String::from_utf8_lossy(text).into_owned();
        return (Err("the line is not valid UTF-8".to_owned()), Original::Text(lossy));
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(err) => {
            // serde_json names line 1 of the one-line document; only the column helps here.
            let message =
                format!("not valid JSON: {err}").replace(" at line 1 column ", " at column ");
            return (Err(message), Original::Text(text.to_owned()));
        }
    };
    let Value::Object(object) = value else {
        let message = format!("expected a JSON object, found {}", describe(&value));
        return (Err(message), Original::Text(text.to_owned()));
    };
    (fields(&object), Original::Json(object))
}

fn fields(object: &Map<String, Value>) -> Result<Fields, String> {
    let mut fields = Fields::default();
    for (name, value) in object {
        let column = Column::parse(name)
            .ok_or_else(|| format!("unknown field {name:?}; the fields are {}", Column::list()))?;
        if column == Column::Qty {
            fields.qty =
                match value {
                    Value::Null => None,
                    Value::Number(n) => Some(n.as_i64().ok_or_else(|| {
                        format!("invalid qty: {n} is not a whole number in range")
                    })?),
                    other => {
                        return Err(format!(
                            "invalid qty: must be a number, found {}",
                            describe(other)
                        ));
                    }
                };
            continue;
        }
        let text = match value {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => {
                return Err(format!(
                    "invalid {}: must be a string, found {}",
                    column.name(),
                    describe(other)
                ));
            }
        };
        fields.set_text(column, text);
    }
    Ok(fields)
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(line: &str) -> String {
        parse_line(line.as_bytes()).0.unwrap_err()
    }

    #[test]
    fn fields_types_and_nulls() {
        let (fields, _) = parse_line(
            br#"{"key":"k1","kind":"adjust","sku":"S","qty":-3,"location":"A","reason":"count","to_location":null,"error":"old"}"#,
        );
        let fields = fields.unwrap();
        assert_eq!(fields.key.as_deref(), Some("k1"));
        assert_eq!(fields.qty, Some(-3));
        assert_eq!(fields.to_location, None);
        assert_eq!(fields.reason.as_deref(), Some("count"));
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(error("[1,2]").contains("expected a JSON object, found an array"));
        assert!(error("\"key\"").contains("found a string"));
        assert!(error("{\"key\":").starts_with("not valid JSON: EOF while parsing"));
        assert!(error(r#"{"qty":"5"}"#).contains("invalid qty: must be a number, found a string"));
        assert!(error(r#"{"qty":1.5}"#).contains("invalid qty: 1.5 is not a whole number"));
        assert!(error(r#"{"sku":7}"#).contains("invalid sku: must be a string, found a number"));
        assert!(error(r#"{"colour":"red"}"#).starts_with("unknown field \"colour\""));
        assert_eq!(parse_line(b"{\"key\":\"\xff\"}").0.unwrap_err(), "the line is not valid UTF-8");
    }
}

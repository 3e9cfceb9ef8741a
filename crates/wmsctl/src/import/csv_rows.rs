//! CSV records assembled from physical lines. A quoted field may hold line breaks, so a record
//! can span several lines; it is numbered by the line it starts on. The splitting is done here
//! rather than by the `csv` crate's reader because import needs what that reader does not give:
//! a cap on a record's size that refuses the record and goes on with the next line, and the
//! physical line of every record. Quoting follows RFC 4180 (`"` opens a quoted field at its
//! start, `""` inside one is a quote) and, like most readers, keeps text after a closing quote.

use std::io::{self, BufRead};

use super::MAX_RECORD_BYTES;
use super::lines::Lines;

/// One CSV record as bytes, before it is checked against the header.
#[derive(Debug)]
pub struct RawRecord {
    /// The physical line the record starts on.
    pub line: u64,
    /// The fields, or why the record could not be split into fields.
    pub fields: Result<Vec<Vec<u8>>, String>,
}

/// Reads the next record, skipping blank lines between records. `Ok(None)` at the end.
pub fn next_record<R: BufRead>(lines: &mut Lines<R>) -> io::Result<Option<RawRecord>> {
    let mut splitter = Splitter::default();
    let mut start = None;
    let mut size = 0usize;
    loop {
        let Some(line) = lines.next_line()? else {
            return Ok(start.map(|start| RawRecord {
                line: start,
                fields: Err("a quoted field is never closed: the record runs to the end of the \
                             file"
                    .to_owned()),
            }));
        };
        let start = match start {
            Some(start) => start,
            None if line.is_blank() => continue,
            None => *start.insert(line.number),
        };
        if line.too_long {
            return Ok(Some(RawRecord { line: start, fields: Err(too_long(start, line.number)) }));
        }
        size += line.text.len() + 1;
        if size > MAX_RECORD_BYTES {
            return Ok(Some(RawRecord { line: start, fields: Err(too_long(start, line.number)) }));
        }
        if splitter.feed(line.text) {
            return Ok(Some(RawRecord { line: start, fields: Ok(splitter.fields) }));
        }
    }
}

fn too_long(start: u64, at: u64) -> String {
    if start == at {
        "the line is longer than the limit of 1 MiB".to_owned()
    } else {
        format!(
            "the record runs on to line {at} and is longer than the limit of 1 MiB \
             (is a quote left open?)"
        )
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: either the closing one, or the first of `""`.
    QuoteInQuoted,
}

/// Splits the lines of one record into fields.
#[derive(Debug, Default)]
struct Splitter {
    fields: Vec<Vec<u8>>,
    field: Vec<u8>,
    state: State,
    continued: bool,
}

impl Splitter {
    /// Takes one physical line; true when the record ends with it.
    fn feed(&mut self, line: &[u8]) -> bool {
        if self.continued {
            self.field.push(b'\n');
        }
        for &byte in line {
            self.state = match (self.state, byte) {
                (State::FieldStart, b'"') => State::Quoted,
                (State::FieldStart | State::Unquoted | State::QuoteInQuoted, b',') => {
                    self.fields.push(std::mem::take(&mut self.field));
                    State::FieldStart
                }
                (State::FieldStart | State::Unquoted, _) => {
                    self.field.push(byte);
                    State::Unquoted
                }
                (State::Quoted, b'"') => State::QuoteInQuoted,
                (State::Quoted, _) => {
                    self.field.push(byte);
                    State::Quoted
                }
                (State::QuoteInQuoted, b'"') => {
                    self.field.push(b'"');
                    State::Quoted
                }
                (State::QuoteInQuoted, _) => {
                    self.field.push(byte);
                    State::Unquoted
                }
            };
        }
        if self.state == State::Quoted {
            self.continued = true;
            return false;
        }
        self.fields.push(std::mem::take(&mut self.field));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &str) -> Vec<(u64, Result<Vec<String>, String>)> {
        let mut lines = Lines::new(input.as_bytes(), MAX_RECORD_BYTES);
        let mut out = Vec::new();
        while let Some(record) = next_record(&mut lines).unwrap() {
            let fields = record
                .fields
                .map(|fields| fields.into_iter().map(|f| String::from_utf8(f).unwrap()).collect());
            out.push((record.line, fields));
        }
        out
    }

    fn ok(line: u64, fields: &[&str]) -> (u64, Result<Vec<String>, String>) {
        (line, Ok(fields.iter().map(|f| (*f).to_owned()).collect()))
    }

    #[test]
    fn quoting_and_line_numbers() {
        let input = "a,b\r\n\r\n\"x,1\",\"say \"\"hi\"\"\"\n\"multi\nline\",z\nlast,\n";
        assert_eq!(
            records(input),
            [
                ok(1, &["a", "b"]),
                ok(3, &["x,1", "say \"hi\""]),
                ok(4, &["multi\nline", "z"]),
                ok(6, &["last", ""]),
            ]
        );
    }

    #[test]
    fn quoted_blank_line_belongs_to_the_field() {
        assert_eq!(records("\"a\n\nb\",c\nd,e"), [ok(1, &["a\n\nb", "c"]), ok(4, &["d", "e"])]);
    }

    #[test]
    fn unclosed_quote_is_refused_at_the_end() {
        let got = records("a,b\n\"open,c\nmore\n");
        assert_eq!(got[0], ok(1, &["a", "b"]));
        assert_eq!(got[1].0, 2);
        assert!(got[1].1.as_ref().unwrap_err().contains("never closed"), "{got:?}");
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn stray_quotes_inside_unquoted_fields_are_text() {
        assert_eq!(records("ab\"c,\"d\"e\n"), [ok(1, &["ab\"c", "de"])]);
    }
}

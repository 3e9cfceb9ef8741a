//! Reading import files, CSV or JSON Lines, one record at a time with the physical line it
//! starts on, so that a file of any size streams through in flat memory. A malformed record is
//! refused alone, with a message saying what is wrong; only a missing or unusable header (or no
//! content at all) stops the whole file. Nothing here touches the database.

mod csv_rows;
mod json_lines;
mod lines;
mod reject;

use std::fmt;
use std::io::{self, BufRead};
use std::path::Path;

use idem_core::{IdemKey, Kind, Request};

use self::lines::Lines;
pub use self::reject::RejectFile;

/// The most one record (a CSV record, or a JSON line) may take; longer ones are refused. Real
/// records are a few hundred bytes: the cap only keeps a broken file from filling memory.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    /// The format a file name suggests: `.csv`, or `.jsonl` and `.ndjson`.
    pub fn from_extension(path: &Path) -> Option<Format> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }
}

/// The columns of an import file (the field names of a JSON line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Key,
    Kind,
    Sku,
    Qty,
    Location,
    ToLocation,
    Reference,
    Reason,
    /// Written into reject files and ignored on reading, so that a fixed reject file can be
    /// imported as it is.
    Error,
}

impl Column {
    const DATA: [Column; 8] = [
        Column::Key,
        Column::Kind,
        Column::Sku,
        Column::Qty,
        Column::Location,
        Column::ToLocation,
        Column::Reference,
        Column::Reason,
    ];
    const REQUIRED: [Column; 5] =
        [Column::Key, Column::Kind, Column::Sku, Column::Qty, Column::Location];

    pub fn name(self) -> &'static str {
        match self {
            Column::Key => "key",
            Column::Kind => "kind",
            Column::Sku => "sku",
            Column::Qty => "qty",
            Column::Location => "location",
            Column::ToLocation => "to_location",
            Column::Reference => "reference",
            Column::Reason => "reason",
            Column::Error => "error",
        }
    }

    /// A column by name, ignoring case and surrounding spaces.
    pub fn parse(name: &str) -> Option<Column> {
        let name = name.trim();
        Column::DATA
            .into_iter()
            .chain([Column::Error])
            .find(|column| column.name().eq_ignore_ascii_case(name))
    }

    fn list() -> String {
        Column::DATA.map(Column::name).join(", ")
    }
}

/// The fields of one record, as text; `None` for an absent field or an empty CSV cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    pub key: Option<String>,
    pub kind: Option<String>,
    pub sku: Option<String>,
    pub qty: Option<i64>,
    pub location: Option<String>,
    pub to_location: Option<String>,
    pub reference: Option<String>,
    pub reason: Option<String>,
}

impl Fields {
    fn set_text(&mut self, column: Column, value: Option<String>) {
        let slot = match column {
            Column::Key => &mut self.key,
            Column::Kind => &mut self.kind,
            Column::Sku => &mut self.sku,
            Column::Location => &mut self.location,
            Column::ToLocation => &mut self.to_location,
            Column::Reference => &mut self.reference,
            Column::Reason => &mut self.reason,
            Column::Qty | Column::Error => return,
        };
        *slot = value;
    }

    /// Validates the fields into a key and a request, the same way the posting commands do;
    /// the error is the message the operator reads next to the line number.
    pub fn request(&self) -> Result<(IdemKey, Request), String> {
        fn required<'a, T>(value: &'a Option<T>, name: &str) -> Result<&'a T, String> {
            value.as_ref().ok_or_else(|| format!("missing {name}"))
        }
        let key = IdemKey::parse(required(&self.key, "key")?).map_err(|e| e.to_string())?;
        let kind: Kind =
            required(&self.kind, "kind")?.parse().map_err(|e: idem_core::Error| e.to_string())?;
        let request = Request::new(
            kind,
            required(&self.sku, "sku")?,
            *required(&self.qty, "qty")?,
            required(&self.location, "location")?,
            self.to_location.as_deref(),
            self.reference.as_deref(),
            self.reason.as_deref(),
        )
        .map_err(|err| match err {
            // The file's column is `qty` for every kind, the signed delta for an adjustment.
            idem_core::Error::InvalidInput { field: "delta", rule } => {
                format!("invalid qty: {rule}")
            }
            other => other.to_string(),
        })?;
        Ok((key, request))
    }
}

/// What a reject file copies of a refused record.
#[derive(Debug, Clone)]
pub enum Original {
    /// CSV cells, in the order of the header's columns.
    Csv(Vec<String>),
    /// A JSON line that is an object.
    Json(serde_json::Map<String, serde_json::Value>),
    /// A line that could not be read as a record, as text (invalid UTF-8 replaced).
    Text(String),
    /// A record too long to copy.
    TooLong,
}

/// One record of the file.
#[derive(Debug)]
pub struct Record {
    /// The physical line the record starts on, 1-based, counting the header.
    pub line: u64,
    pub fields: Result<Fields, String>,
    pub original: Original,
}

/// Why a file cannot be imported at all.
#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    /// No content: not even a header.
    Empty,
    /// A problem with the whole file, found on this line (a bad header, a UTF-16 file).
    Data {
        line: u64,
        message: String,
    },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io(err) => write!(f, "{err}"),
            OpenError::Empty => f.write_str(
                "the input is empty: expected a CSV header row (key,kind,sku,qty,location,...) \
                 or JSON Lines",
            ),
            OpenError::Data { line, message } => write!(f, "line {line}: {message}"),
        }
    }
}

/// Reads records from an input in either format.
pub struct Reader {
    lines: Lines<Box<dyn BufRead>>,
    format: Format,
    /// The CSV header's columns, in file order.
    columns: Vec<Column>,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("format", &self.format)
            .field("columns", &self.columns)
            .field("line", &self.lines.number())
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Starts reading: finds the format when none is given (a first non-blank byte of `{`
    /// means JSON Lines, anything else CSV) and reads the CSV header.
    pub fn open(input: Box<dyn BufRead>, format: Option<Format>) -> Result<Reader, OpenError> {
        let mut lines = Lines::new(input, MAX_RECORD_BYTES);
        let first = loop {
            match lines.next_line().map_err(OpenError::Io)? {
                None => return Err(OpenError::Empty),
                Some(line) if line.is_blank() => continue,
                Some(line) => break line,
            }
        };
        if first.number == 1
            && (first.text.starts_with(b"\xff\xfe") || first.text.starts_with(b"\xfe\xff"))
        {
            return Err(OpenError::Data {
                line: 1,
                message: "the input is UTF-16; save it as UTF-8 and import it again".to_owned(),
            });
        }
        let format = format.unwrap_or_else(|| {
            let first_byte = first.text.iter().find(|b| !b.is_ascii_whitespace());
            if first_byte == Some(&b'{') { Format::Jsonl } else { Format::Csv }
        });
        lines.push_back();

        let columns = match format {
            Format::Jsonl => Vec::new(),
            Format::Csv => {
                let header = csv_rows::next_record(&mut lines)
                    .map_err(OpenError::Io)?
                    .ok_or(OpenError::Empty)?;
                let line = header.line;
                header_columns(header.fields)
                    .map_err(|message| OpenError::Data { line, message })?
            }
        };
        Ok(Reader { lines, format, columns })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The CSV header's columns; empty for JSON Lines.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The number of the last physical line read.
    pub fn line(&self) -> u64 {
        self.lines.number()
    }

    /// How many bytes of the input have been read into records.
    pub fn position(&self) -> u64 {
        self.lines.consumed()
    }

    /// The next record, skipping blank lines (and CSV rows of nothing but empty cells).
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        match self.format {
            Format::Jsonl => loop {
                let Some(line) = self.lines.next_line()? else {
                    return Ok(None);
                };
                if line.is_blank() {
                    continue;
                }
                if line.too_long {
                    let message = "the line is longer than the limit of 1 MiB".to_owned();
                    return Ok(Some(Record {
                        line: line.number,
                        fields: Err(message),
                        original: Original::TooLong,
                    }));
                }
                let (fields, original) = json_lines::parse_line(line.text);
                return Ok(Some(Record { line: line.number, fields, original }));
            },
            Format::Csv => loop {
                let Some(raw) = csv_rows::next_record(&mut self.lines)? else {
                    return Ok(None);
                };
                let cells = match raw.fields {
                    Ok(cells) => cells,
                    Err(message) => {
                        return Ok(Some(Record {
                            line: raw.line,
                            fields: Err(message),
                            original: Original::TooLong,
                        }));
                    }
                };
                if cells.iter().all(|cell| cell.is_empty()) {
                    continue;
                }
                return Ok(Some(self.csv_record(raw.line, cells)));
            },
        }
    }

    fn csv_record(&self, line: u64, cells: Vec<Vec<u8>>) -> Record {
        let utf8 = cells.iter().all(|cell| std::str::from_utf8(cell).is_ok());
        let texts: Vec<String> =
            cells.iter().map(|cell| String::from_utf8_lossy(cell).into_owned()).collect();
        let fields = if !utf8 {
            Err("the line is not valid UTF-8".to_owned())
        } else if texts.len() != self.columns.len() {
            Err(format!(
                "expected {} fields as in the header, found {}",
                self.columns.len(),
                texts.len()
            ))
        } else {
            self.csv_fields(&texts)
        };
        Record { line, fields, original: Original::Csv(texts) }
    }

    fn csv_fields(&self, texts: &[String]) -> Result<Fields, String> {
        let mut fields = Fields::default();
        for (column, text) in self.columns.iter().zip(texts) {
            if text.is_empty() {
                continue;
            }
            if *column == Column::Qty {
                // Rust's integer parsing takes an optional sign, `+5` included.
                let qty = text
                    .parse()
                    .map_err(|_| format!("invalid qty: {text:?} is not a whole number"))?;
                fields.qty = Some(qty);
            } else {
                fields.set_text(*column, Some(text.clone()));
            }
        }
        Ok(fields)
    }
}

/// The header's columns, or why the header is unusable.
fn header_columns(cells: Result<Vec<Vec<u8>>, String>) -> Result<Vec<Column>, String> {
    let cells = cells.map_err(|message| format!("cannot read the header: {message}"))?;
    let mut columns = Vec::with_capacity(cells.len());
    for cell in &cells {
        let name = std::str::from_utf8(cell)
            .map_err(|_| "the header is not valid UTF-8".to_owned())?
            .trim();
        let column = Column::parse(name).ok_or_else(|| {
            let mut message = format!(
                "unknown column {name:?} in the header; the columns are {}",
                Column::list()
            );
            if !cells
                .iter()
                .any(|c| std::str::from_utf8(c).is_ok_and(|c| Column::parse(c).is_some()))
            {
                message.push_str(
                    "; the first line must be a header naming them, such as \
                     key,kind,sku,qty,location",
                );
            }
            message
        })?;
        if columns.contains(&column) {
            return Err(format!("column {:?} appears twice in the header", column.name()));
        }
        columns.push(column);
    }
    let missing: Vec<&str> =
        Column::REQUIRED.into_iter().filter(|c| !columns.contains(c)).map(Column::name).collect();
    if !missing.is_empty() {
        return Err(format!(
            "the header lacks the required column(s) {}; key, kind, sku, qty and location are \
             required",
            missing.join(", ")
        ));
    }
    Ok(columns)
}

#[cfg(test)]
mod tests;

//! The reject file: every refused record, in the input's format, with an `error` column (a field
//! for JSON Lines) saying why, so that it can be fixed and imported again as it is. An `error`
//! column in the input is dropped and written afresh.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde_json::Value;

use super::{Column, Format, Original, Record};

/// An open reject file.
#[derive(Debug)]
pub struct RejectFile {
    out: Out,
}

#[derive(Debug)]
enum Out {
    /// `cells[i]` of the reject file is the input's cell `picks[i]`.
    Csv {
        writer: Box<csv::Writer<BufWriter<File>>>,
        picks: Vec<usize>,
    },
    Jsonl(BufWriter<File>),
}

impl RejectFile {
    /// Creates (or truncates) the file. For CSV the header repeats the input's columns, in the
    /// input's order, followed by `error`.
    pub fn create(path: &Path, format: Format, columns: &[Column]) -> io::Result<RejectFile> {
        let file = BufWriter::new(File::create(path)?);
        let out = match format {
            Format::Csv => {
                let picks: Vec<usize> =
                    (0..columns.len()).filter(|&at| columns[at] != Column::Error).collect();
                let mut writer = csv::WriterBuilder::new()
                    .terminator(csv::Terminator::Any(b'\n'))
                    .from_writer(file);
                let header = picks.iter().map(|&at| columns[at].name());
                writer.write_record(header.chain([Column::Error.name()]))?;
                Out::Csv { writer: Box::new(writer), picks }
            }
            Format::Jsonl => Out::Jsonl(file),
        };
        Ok(RejectFile { out })
    }

    /// Copies one refused record with its error.
    /// A CSV record with the wrong number of cells is copied cell by cell as far as the header
    /// goes; the error says how many it had.
    pub fn write(&mut self, record: &Record, error: &str) -> io::Result<()> {
        match &mut self.out {
            Out::Csv { writer, picks } => {
                let cells: Vec<&str> = match &record.original {
                    Original::Csv(cells) => {
                        picks.iter().map(|&at| cells.get(at).map_or("", String::as_str)).collect()
                    }
                    _ => vec![""; picks.len()],
                };
                writer.write_record(cells.into_iter().chain([error]))?;
            }
            Out::Jsonl(file) => {
                let error = Value::String(error.to_owned());
                let mut object = match &record.original {
                    Original::Json(object) => object.clone(),
                    Original::Text(text) => serde_json::Map::from_iter([(
                        "input".to_owned(),
                        Value::String(text.clone()),
                    )]),
                    Original::Csv(_) | Original::TooLong => serde_json::Map::new(),
                };
                object.retain(|name, _| Column::parse(name) != Some(Column::Error));
                object.insert(Column::Error.name().to_owned(), error);
                serde_json::to_writer(&mut *file, &object)?;
                file.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    /// Writes out everything buffered; to be called once at the end, and its error reported.
    pub fn finish(self) -> io::Result<()> {
        match self.out {
            Out::Csv { mut writer, .. } => writer.flush(),
            Out::Jsonl(mut file) => file.flush(),
        }
    }
}

//! Rendering for people and scripts: data to stdout as a table, plain tab-separated lines, JSON
//! or JSON Lines; notes, warnings and errors to stderr behind `wmsctl:`. Text that came from a
//! user never reaches the terminal with its control characters intact.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use comfy_table::{Cell, Color, ContentArrangement, Table, presets};
use serde::Serialize;

use crate::cli::{ColorChoice, GlobalArgs, OutputFormat};
use crate::config;

/// The terminal side of a command: where and how to write.
#[derive(Debug, Clone)]
pub struct Ui {
    pub format: OutputFormat,
    /// True when `-o` was given, so that commands silent by default know they were asked.
    pub format_requested: bool,
    pub quiet: bool,
    pub verbose: u8,
    pub color: bool,
}

impl Ui {
    pub fn new(global: &GlobalArgs) -> Self {
        let color = match global.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::io::stdout().is_terminal()
            }
        };
        Ui {
            format: config::output_format(global),
            format_requested: global.output.is_some(),
            quiet: global.quiet,
            verbose: global.verbose,
            color,
        }
    }

    pub fn is_json(&self) -> bool {
        matches!(self.format, OutputFormat::Json | OutputFormat::Jsonl)
    }

    /// A status note on stderr, silenced by `-q`.
    pub fn note(&self, message: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("wmsctl: {}", escape(message.as_ref()));
        }
    }

    /// A detail on stderr, shown only with `-v`.
    pub fn detail(&self, message: impl AsRef<str>) {
        if self.verbose > 0 && !self.quiet {
            eprintln!("wmsctl: {}", escape(message.as_ref()));
        }
    }

    /// A warning on stderr: shown even with `-q`.
    pub fn warn(&self, message: impl AsRef<str>) {
        eprintln!("wmsctl: warning: {}", escape(message.as_ref()));
    }

    /// One record: a two-column table, one plain line, or one JSON object.
    pub fn record<T: Serialize>(
        &self,
        value: &T,
        fields: &[(&str, String)],
    ) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match self.format {
            OutputFormat::Json => writeln!(out, "{}", pretty(value)),
            OutputFormat::Jsonl | OutputFormat::Prometheus => writeln!(out, "{}", compact(value)),
            OutputFormat::Plain => {
                let cells: Vec<Cow<str>> = fields.iter().map(|(_, v)| escape(v)).collect();
                writeln!(out, "{}", cells.join("\t"))
            }
            OutputFormat::Table => {
                let mut table = self.table();
                for (name, value) in fields {
                    table.add_row(vec![Cell::new(name), self.cell(value)]);
                }
                writeln!(out, "{table}")
            }
        }
    }

    /// Many records: a table with a header, plain lines, a JSON array, or JSON Lines.
    pub fn list<T: Serialize>(
        &self,
        items: &[T],
        headers: &[&str],
        row: impl Fn(&T) -> Vec<String>,
    ) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match self.format {
            OutputFormat::Json => writeln!(out, "{}", pretty(&items)),
            OutputFormat::Jsonl | OutputFormat::Prometheus => {
                items.iter().try_for_each(|item| writeln!(out, "{}", compact(item)))
            }
            OutputFormat::Plain => items.iter().try_for_each(|item| {
                let cells: Vec<String> = row(item).iter().map(|c| escape(c).into_owned()).collect();
                writeln!(out, "{}", cells.join("\t"))
            }),
            OutputFormat::Table => {
                let mut table = self.table();
                table.set_header(headers.to_vec());
                for item in items {
                    table.add_row(row(item).iter().map(|c| self.cell(c)).collect::<Vec<_>>());
                }
                writeln!(out, "{table}")
            }
        }
    }

    fn table(&self) -> Table {
        let mut table = Table::new();
        table.load_style(presets::UTF8_FULL_CONDENSED);
        table.set_content_arrangement(ContentArrangement::Dynamic);
        if !self.color {
            table.force_no_tty();
        }
        table
    }

    fn cell(&self, text: &str) -> Cell {
        let cell = Cell::new(escape(text));
        if !self.color {
            return cell;
        }
        match text {
            "applied" | "live" => cell.fg(Color::Green),
            "replayed" | "expired" => cell.fg(Color::Yellow),
            "conflict" | "rejected" | "unknown" => cell.fg(Color::Red),
            _ => cell,
        }
    }
}

fn pretty<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("output values always serialize")
}

fn compact<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("output values always serialize")
}

/// Replaces control and text-direction characters with visible escapes, so that stored text
/// can neither move the cursor nor reorder what an operator reads.
pub fn escape(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A time as operators read it: UTC, to the second.
pub fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

pub fn opt(value: Option<&str>) -> String {
    value.unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escape_neutralizes_terminal_control() {
        assert_eq!(escape("plain 東京 'x'"), "plain 東京 'x'");
        assert_eq!(escape("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape("x\u{202e}y\nz\0"), "x\\u{202e}y\\nz\\u{0}");
    }
}

//! The figures of a run: a table of medians and ratios on stdout, and the same as JSON.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::machine::Machine;
use crate::measure::Samples;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Millis,
    PerSecond,
    Megabytes,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::Millis if value < 10.0 => format!("{value:.2} ms"),
            Unit::Millis if value < 10_000.0 => format!("{value:.1} ms"),
            Unit::Millis => format!("{:.2} s", value / 1e3),
            Unit::PerSecond => format!("{} /s", thousands(value)),
            Unit::Megabytes => format!("{value:.1} MB"),
        }
    }
}

/// `12345.6` as `12,346`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One measured side of a figure.
#[derive(Debug, Clone, Serialize)]
pub struct Value {
    /// What was measured: `wmsctl receive`, `sqlite3`, `sqlx chunks of 1,000`, ...
    pub label: String,
    pub median: f64,
    pub unit: Unit,
    pub samples: Vec<f64>,
}

impl Value {
    pub fn new(label: impl Into<String>, unit: Unit, samples: &Samples) -> Value {
        Value { label: label.into(), median: samples.median(), unit, samples: samples.0.clone() }
    }

    /// A single reading rather than a median of several.
    pub fn single(label: impl Into<String>, unit: Unit, value: f64) -> Value {
        Value::new(label, unit, &Samples(vec![value]))
    }
}

/// One condition of a goal, such as `ratio ≤ 1.5×` or `at least 20,000 /s`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub goal: String,
    pub met: bool,
}

impl Check {
    pub fn ratio_at_most(ratio: f64, limit: f64) -> Check {
        Check { goal: format!("≤ {limit}×"), met: ratio <= limit }
    }

    pub fn ratio_at_least(ratio: f64, limit: f64) -> Check {
        Check { goal: format!("≥ {limit}×"), met: ratio >= limit }
    }

    pub fn value_at_most(value: &Value, limit: f64) -> Check {
        Check { goal: format!("≤ {}", value.unit.format(limit)), met: value.median <= limit }
    }

    pub fn value_at_least(value: &Value, limit: f64) -> Check {
        Check { goal: format!("≥ {}", value.unit.format(limit)), met: value.median >= limit }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable name for scripts reading the JSON, e.g. `single_posting.sqlite`.
    pub id: String,
    pub title: String,
    pub database: Option<&'static str>,
    pub product: Value,
    pub baseline: Option<Value>,
    /// product ÷ baseline, for times and rates alike.
    pub ratio: Option<f64>,
    pub checks: Vec<Check>,
    pub note: Option<String>,
}

impl Figure {
    /// A figure comparing the product with a baseline measured in the same rounds.
    pub fn compare(
        id: impl Into<String>,
        title: impl Into<String>,
        database: Option<&'static str>,
        product: Value,
        baseline: Value,
    ) -> Figure {
        let ratio = product.median / baseline.median;
        Figure {
            id: id.into(),
            title: title.into(),
            database,
            product,
            baseline: Some(baseline),
            ratio: Some(ratio),
            checks: Vec::new(),
            note: None,
        }
    }

    pub fn check(mut self, check: impl FnOnce(&Figure) -> Check) -> Figure {
        let check = check(&self);
        self.checks.push(check);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = Some(note.into());
        self
    }

    pub fn ratio(&self) -> f64 {
        self.ratio.unwrap_or(f64::NAN)
    }

    fn verdict(&self) -> &'static str {
        match (self.checks.is_empty(), self.checks.iter().all(|c| c.met)) {
            (true, _) => "",
            (false, true) => "met",
            (false, false) => "MISSED",
        }
    }
}

/// A figure that could not be measured, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub postgres: String,
    pub quick: bool,
    pub seconds: f64,
    pub figures: Vec<Figure>,
    pub skipped: Vec<Skipped>,
}

impl Report {
    /// The table: one line per figure, then the notes and the figures left out.
    pub fn table(&self) -> String {
        let header = ["figure", "db", "product", "baseline", "ratio", "goal", ""];
        let rows: Vec<[String; 7]> = self
            .figures
            .iter()
            .map(|f| {
                [
                    f.title.clone(),
                    f.database.unwrap_or("").to_owned(),
                    format!("{} {}", f.product.unit.format(f.product.median), f.product.label),
                    f.baseline.as_ref().map_or(String::new(), |b| {
                        format!("{} {}", b.unit.format(b.median), b.label)
                    }),
                    f.ratio.map_or(String::new(), |r| format!("{r:.2}×")),
                    f.checks.iter().map(|c| c.goal.as_str()).collect::<Vec<_>>().join(", "),
                    f.verdict().to_owned(),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }

        let mut out = String::new();
        writeln!(out, "machine: {}", self.machine.summary()).ok();
        writeln!(out, "server:  {}", self.postgres).ok();
        let mode =
            if self.quick { "quick mode (small sizes: not the goals' sizes)" } else { "full" };
        writeln!(
            out,
            "run:     {mode}, {:.0} s; every value is a median of its runs\n",
            self.seconds
        )
        .ok();
        let line = |out: &mut String, cells: &[String]| {
            let padded: Vec<String> =
                cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            writeln!(out, "{}", padded.join("  ").trim_end()).ok();
        };
        line(&mut out, &header.map(str::to_owned));
        for row in &rows {
            line(&mut out, row);
        }
        for figure in self.figures.iter().filter(|f| f.note.is_some()) {
            let runs = figure.product.samples.len();
            writeln!(
                out,
                "\n{} ({runs} runs): {}",
                figure.id,
                figure.note.as_deref().unwrap_or("")
            )
            .ok();
        }
        for skipped in &self.skipped {
            writeln!(out, "\nnot measured: {}: {}", skipped.id, skipped.reason).ok();
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }
}

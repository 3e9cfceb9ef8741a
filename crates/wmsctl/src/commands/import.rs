//! `import`: post many transactions from a CSV or JSON Lines file. The file is read and posted
//! in chunks, each chunk one database transaction in which every line is still a posting of its
//! own with its own outcome ([`Store::post_batch`]), so memory stays flat and a refused line never
//! takes its neighbours down. Refused lines are reported as `FILE:LINE: message`, copied to the
//! reject file and counted; the summary and the exit code say what happened. Running the same
//! import again is always safe: lines already committed replay.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::{DateTime, TimeDelta, Utc};
use idem_core::{BatchPlan, Error, Operator, Outcome, Posted, Posting, Store, Transaction};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::Context;
use crate::cli::{ImportArgs, ImportFormat, OutputFormat};
use crate::exit::{CANT_CREATE, DATA_REFUSED, Failure, NO_INPUT, OK};
use crate::import::{Format, OpenError, Reader, Record, RejectFile};
use crate::output::escape;

pub async fn run(ctx: &Context, args: ImportArgs) -> Result<u8> {
    let started = Instant::now();
    let input = Input::open(&args.file)?;
    let format = match args.format {
        Some(ImportFormat::Csv) => Some(Format::Csv),
        Some(ImportFormat::Jsonl) => Some(Format::Jsonl),
        None => Format::from_extension(&args.file),
    };
    let mut reader =
        Reader::open(input.stream, format).map_err(|err| open_failure(&input.name, err))?;
    let user = ctx.operator()?;
    let ttl = TimeDelta::from_std(args.ttl)
        .map_err(|_| Error::InvalidInput { field: "ttl", rule: "is too long".to_owned() })?;
    let rejects = match &args.reject_file {
        Some(path) => Some(create_reject_file(path, &args.file, &reader)?),
        None => None,
    };
    let store = if args.dry_run { None } else { Some(ctx.store().await?) };
    let user = match &store {
        Some(store) => ctx.acting_operator(store).await?,
        None => user,
    };

    let reading = Reading {
        user,
        ttl,
        chunk_size: args.chunk_size as usize,
        max_errors: args.max_errors,
        name: input.name.clone(),
    };
    let mut import = Import {
        name: input.name,
        max_errors: args.max_errors,
        dry_run: args.dry_run,
        tally: Tally::default(),
        last_line: 0,
        stopped_early: false,
        rejects,
        lines_out: (ctx.ui.format == OutputFormat::Jsonl).then(|| BufWriter::new(io::stdout())),
        progress: Progress::new(ctx, input.len),
        verbose: ctx.ui.verbose > 0 && !ctx.ui.quiet,
    };
    let outcome = import.post_all(&reading, &mut reader, store.as_ref()).await;
    import.progress.finish();
    if let Some(store) = &store {
        store.close().await;
    }
    let finished = import.finish_rejects(args.reject_file.as_deref());
    let summary = import.summary(reader.format(), &args, started.elapsed());
    if !ctx.ui.quiet {
        for line in summary.text() {
            eprintln!("wmsctl: {}", escape(&line));
        }
    }
    outcome?;
    finished?;

    if ctx.ui.format == OutputFormat::Json {
        let mut out = io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &summary)?;
        writeln!(out)?;
    }
    Ok(if import.tally.refused() > 0 { DATA_REFUSED } else { OK })
}

/// The input stream, and its size when it is a file, for the progress bar.
struct Input {
    name: String,
    stream: Box<dyn BufRead>,
    len: Option<u64>,
}

impl Input {
    fn open(path: &Path) -> Result<Input> {
        const BUFFER: usize = 64 * 1024;
        if path == Path::new("-") {
            let stream = Box::new(BufReader::with_capacity(BUFFER, io::stdin()));
            return Ok(Input { name: "<stdin>".to_owned(), stream, len: None });
        }
        let name = path.display().to_string();
        let file = File::open(path).map_err(|err| {
            Failure::new(NO_INPUT, "input_unreadable", format!("cannot open {name}: {err}"))
        })?;
        let len = file.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
        Ok(Input { name, stream: Box::new(BufReader::with_capacity(BUFFER, file)), len })
    }
}

fn open_failure(name: &str, err: OpenError) -> anyhow::Error {
    match err {
        OpenError::Io(err) => read_failure(name, err),
        OpenError::Empty => {
            Failure::new(DATA_REFUSED, "invalid_input", format!("{name}: {err}")).into()
        }
        OpenError::Data { line, message } => {
            Failure::new(DATA_REFUSED, "invalid_input", format!("{name}:{line}: {message}")).into()
        }
    }
}

fn read_failure(name: &str, err: io::Error) -> anyhow::Error {
    Failure::new(NO_INPUT, "input_unreadable", format!("cannot read {name}: {err}")).into()
}

fn create_reject_file(path: &Path, input: &Path, reader: &Reader) -> Result<RejectFile> {
    let shown = path.display();
    if is_same_file(path, input) {
        let message = format!("the reject file {shown} is the input file; choose another name");
        return Err(Failure::new(CANT_CREATE, "cant_create", message).into());
    }
    RejectFile::create(path, reader.format(), reader.columns()).map_err(|err| {
        let message = format!("cannot create the reject file {shown}: {err}");
        Failure::new(CANT_CREATE, "cant_create", message).into()
    })
}

fn is_same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// How each line ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum LineOutcome {
    Applied,
    Replayed,
    Conflict,
    Rejected,
    Invalid,
    /// Dry run: the line is valid and would be posted.
    Valid,
}

/// One line of `-o jsonl` output.
#[derive(Debug, Serialize)]
struct LineOutput<'a> {
    line: u64,
    outcome: LineOutcome,
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transaction: Option<&'a Transaction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reused_expired_key: Option<uuid::Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<LineError<'a>>,
}

#[derive(Debug, Serialize)]
struct LineError<'a> {
    code: &'static str,
    message: &'a str,
}

/// What became of one line, once validated and (unless a dry run) posted.
enum Verdict {
    Posted(Posted),
    Valid(&'static str),
    Refused { outcome: LineOutcome, code: &'static str, message: String },
}

impl Verdict {
    fn invalid(message: String) -> Verdict {
        Verdict::Refused { outcome: LineOutcome::Invalid, code: "invalid_input", message }
    }

    fn from_result(result: idem_core::Result<Posted>) -> Verdict {
        match result {
            Ok(posted) => Verdict::Posted(posted),
            Err(err) => {
                let outcome = match err {
                    Error::KeyConflict { .. } | Error::DuplicateRefused { .. } => {
                        LineOutcome::Conflict
                    }
                    Error::InvalidInput { .. } => LineOutcome::Invalid,
                    _ => LineOutcome::Rejected,
                };
                Verdict::Refused { outcome, code: err.code(), message: err.to_string() }
            }
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    read: u64,
    valid: u64,
    valid_by_kind: BTreeMap<&'static str, u64>,
    applied: u64,
    replayed: u64,
    conflicts: u64,
    rejected: u64,
    invalid: u64,
}

impl Tally {
    fn refused(&self) -> u64 {
        self.conflicts + self.rejected + self.invalid
    }
}

/// One import run: where it stands, and where its results go.
struct Import {
    name: String,
    max_errors: Option<u64>,
    dry_run: bool,
    tally: Tally,
    /// The last physical line of the input that was processed.
    last_line: u64,
    stopped_early: bool,
    rejects: Option<RejectFile>,
    lines_out: Option<BufWriter<io::Stdout>>,
    progress: Progress,
    verbose: bool,
}

/// The lines of one chunk as read and checked, before posting.
struct Chunk {
    /// Each line, with the reason it is invalid if it is.
    lines: Vec<(Record, Option<String>)>,
    /// The postings of the valid lines, in order.
    postings: Vec<Posting>,
    /// Their batch, planned while the chunk before was posted.
    plan: Option<BatchPlan>,
    /// The input ended within this chunk.
    at_end: bool,
    /// `--max-errors` was reached within this chunk.
    stop: bool,
    /// The reader's line and byte position after the chunk.
    end_line: u64,
    end_position: u64,
}

/// How a chunk is read: what every posting of the import shares.
struct Reading {
    user: Operator,
    ttl: TimeDelta,
    chunk_size: usize,
    max_errors: Option<u64>,
    name: String,
}

/// Lines read between two chances for a batch being posted meanwhile to send its next
/// statement (see [`Import::post_all`]).
const LINES_BETWEEN_YIELDS: usize = 64;

impl Reading {
    /// Reads and checks up to a chunk of lines; `refused` is the count refused before them, for
    /// `--max-errors`. With `give_way`, it lets other work on this thread run every
    /// [`LINES_BETWEEN_YIELDS`] lines.
    async fn chunk(&self, reader: &mut Reader, refused: u64, give_way: bool) -> Result<Chunk> {
        let mut chunk = Chunk {
            lines: Vec::with_capacity(self.chunk_size),
            postings: Vec::new(),
            plan: None,
            at_end: false,
            stop: false,
            end_line: 0,
            end_position: 0,
        };
        let mut invalid_here = 0;
        while chunk.lines.len() < self.chunk_size && !chunk.stop {
            if give_way && chunk.lines.len() % LINES_BETWEEN_YIELDS == LINES_BETWEEN_YIELDS - 1 {
                tokio::task::yield_now().await;
            }
            let Some(record) = reader.next_record().map_err(|e| read_failure(&self.name, e))?
            else {
                chunk.at_end = true;
                break;
            };
            let checked = match &record.fields {
                Ok(fields) => fields.request(),
                Err(message) => Err(message.clone()),
            };
            match checked {
                Ok((key, request)) => {
                    chunk
                        .postings
                        .push(Posting::new(self.user.clone(), key, request).ttl(self.ttl)?);
                    chunk.lines.push((record, None));
                }
                Err(message) => {
                    chunk.lines.push((record, Some(message)));
                    invalid_here += 1;
                    chunk.stop = self.max_errors.is_some_and(|max| refused + invalid_here >= max);
                }
            }
        }
        chunk.end_line = reader.line();
        chunk.end_position = reader.position();
        Ok(chunk)
    }

    /// Reads up to a chunk of lines, giving way to other work on this thread, and plans their
    /// batch ahead of its turn.
    async fn chunk_planned(&self, reader: &mut Reader, store: &Store) -> Result<Chunk> {
        let mut chunk = self.chunk(reader, 0, true).await?;
        if !chunk.postings.is_empty() {
            chunk.plan = Some(store.plan_batch(&chunk.postings, Utc::now()).await?);
        }
        Ok(chunk)
    }

    /// Posts a chunk's valid lines in one batch; one outcome per posting.
    async fn post(
        &self,
        chunk: &mut Chunk,
        store: Option<&Store>,
    ) -> Result<Vec<idem_core::Result<Posted>>> {
        match store {
            Some(store) if !chunk.postings.is_empty() => {
                let posted = match chunk.plan.take() {
                    Some(plan) => store.post_planned(&chunk.postings, plan).await,
                    None => store.post_batch(&chunk.postings, Utc::now()).await,
                };
                posted.map_err(|err| {
                    let first = chunk.lines[0].0.line;
                    let last = chunk.lines[chunk.lines.len() - 1].0.line;
                    anyhow::Error::new(err).context(format!(
                        "{}: the import stopped at lines {first}-{last}; re-running the \
                         import is safe: lines already committed will replay",
                        self.name
                    ))
                })
            }
            _ => Ok(Vec::new()),
        }
    }
}

impl Import {
    /// Reads, validates and posts chunk after chunk until the end of the input, or until
    /// `--max-errors` refused lines.
    ///
    /// On PostgreSQL the next chunk is read, checked and planned ([`Store::plan_batch`]) while
    /// the server writes the current one: the reading gives way every few lines on this one
    /// thread, so each of the batch's statements still goes out as soon as the one before is
    /// answered. Not with `--max-errors`, where whether to read on depends on the current
    /// chunk's outcomes; and not on SQLite, whose writing happens in this process and needs the
    /// other core.
    async fn post_all(
        &mut self,
        reading: &Reading,
        reader: &mut Reader,
        store: Option<&Store>,
    ) -> Result<()> {
        let read_ahead = match store {
            Some(store) if reading.max_errors.is_none() && store.backend_name() == "postgres" => {
                Some(store)
            }
            _ => None,
        };
        let mut next = reading.chunk(reader, self.tally.refused(), false).await?;
        loop {
            let mut chunk = next;
            if chunk.lines.is_empty() {
                return Ok(());
            }
            let (outcomes, ahead) = match read_ahead {
                Some(ahead_store) if !chunk.at_end => {
                    // No --max-errors here, so the count refused so far does not matter.
                    let (outcomes, ahead) = tokio::join!(
                        reading.post(&mut chunk, store),
                        reading.chunk_planned(reader, ahead_store)
                    );
                    (outcomes, Some(ahead))
                }
                _ => (reading.post(&mut chunk, store).await, None),
            };
            let outcomes = outcomes?;
            let (end_line, end_position, at_end, stop) =
                (chunk.end_line, chunk.end_position, chunk.at_end, chunk.stop);
            self.report_chunk(chunk, outcomes)?;
            self.progress.update(&self.tally, end_position);
            self.last_line = end_line;

            if stop || self.limit_reached(self.tally.refused()) {
                // Stopping at the very end of the file is not stopping early.
                self.stopped_early =
                    reader.next_record().map_err(|e| read_failure(&self.name, e))?.is_some();
                return Ok(());
            }
            if at_end {
                return Ok(());
            }
            next = match ahead {
                Some(ahead) => ahead?,
                None => reading.chunk(reader, self.tally.refused(), false).await?,
            };
        }
    }

    /// Reports every line of a posted chunk, in order.
    fn report_chunk(
        &mut self,
        chunk: Chunk,
        outcomes: Vec<idem_core::Result<Posted>>,
    ) -> Result<()> {
        let mut outcomes = outcomes.into_iter();
        let mut postings = chunk.postings.into_iter();
        for (record, invalid) in chunk.lines {
            let verdict = match invalid {
                Some(message) => Verdict::invalid(message),
                None => {
                    let posting = postings.next().expect("one posting per valid line");
                    match outcomes.next() {
                        Some(result) => Verdict::from_result(result),
                        None => Verdict::Valid(posting.request.kind.as_str()),
                    }
                }
            };
            self.report(&record, verdict)?;
        }
        if let Some(out) = &mut self.lines_out {
            out.flush().context("writing results to stdout")?;
        }
        Ok(())
    }

    fn limit_reached(&self, refused: u64) -> bool {
        self.max_errors.is_some_and(|max| refused >= max)
    }

    fn report(&mut self, record: &Record, verdict: Verdict) -> Result<()> {
        let tally = &mut self.tally;
        tally.read += 1;
        if !matches!(verdict, Verdict::Refused { outcome: LineOutcome::Invalid, .. }) {
            tally.valid += 1;
        }
        let key = record.fields.as_ref().ok().and_then(|f| f.key.as_deref());
        let mut output = LineOutput {
            line: record.line,
            outcome: LineOutcome::Valid,
            key,
            transaction: None,
            expires_at: None,
            reused_expired_key: None,
            error: None,
        };
        match &verdict {
            Verdict::Valid(kind) => *tally.valid_by_kind.entry(kind).or_default() += 1,
            Verdict::Posted(posted) => {
                *tally.valid_by_kind.entry(posted.transaction.kind.as_str()).or_default() += 1;
                output.outcome = match posted.outcome {
                    Outcome::Applied => {
                        tally.applied += 1;
                        LineOutcome::Applied
                    }
                    Outcome::Replayed => {
                        tally.replayed += 1;
                        LineOutcome::Replayed
                    }
                };
                output.transaction = Some(&posted.transaction);
                output.expires_at = Some(posted.expires_at);
                output.reused_expired_key = posted.reused_expired_key;
                if let (Some(previous), true) = (posted.reused_expired_key, self.verbose) {
                    self.progress.println(&format!(
                        "wmsctl: {}:{}: key {} had expired and was used again; it was first \
                         used by transaction {previous}",
                        self.name, record.line, posted.transaction.key
                    ));
                }
            }
            Verdict::Refused { outcome, code, message } => {
                match outcome {
                    LineOutcome::Conflict => tally.conflicts += 1,
                    LineOutcome::Invalid => tally.invalid += 1,
                    _ => tally.rejected += 1,
                }
                output.outcome = *outcome;
                output.error = Some(LineError { code, message });
                self.progress.println(&format!("wmsctl: {}:{}: {message}", self.name, record.line));
                if let Some(rejects) = &mut self.rejects {
                    rejects
                        .write(record, &format!("line {}: {message}", record.line))
                        .context("writing the reject file")
                        .map_err(|err| {
                            Failure::new(CANT_CREATE, "cant_create", format!("{err:#}"))
                        })?;
                }
            }
        }
        if let Some(out) = &mut self.lines_out {
            serde_json::to_writer(&mut *out, &output).context("writing results to stdout")?;
            out.write_all(b"\n").context("writing results to stdout")?;
        }
        Ok(())
    }

    fn finish_rejects(&mut self, path: Option<&Path>) -> Result<()> {
        let (Some(rejects), Some(path)) = (self.rejects.take(), path) else {
            return Ok(());
        };
        rejects.finish().map_err(|err| {
            let message = format!("cannot write the reject file {}: {err}", path.display());
            Failure::new(CANT_CREATE, "cant_create", message).into()
        })
    }

    fn summary(&self, format: Format, args: &ImportArgs, elapsed: Duration) -> Summary {
        let t = &self.tally;
        let seconds = elapsed.as_secs_f64();
        Summary {
            file: self.name.clone(),
            format: format.as_str(),
            dry_run: self.dry_run,
            read: t.read,
            valid: t.valid,
            valid_by_kind: t.valid_by_kind.clone(),
            applied: t.applied,
            replayed: t.replayed,
            conflicts: t.conflicts,
            rejected: t.rejected,
            invalid: t.invalid,
            refused: t.refused(),
            stopped_early: self.stopped_early,
            max_errors: args.max_errors,
            last_line: self.last_line,
            reject_file: args.reject_file.as_ref().map(|p| p.display().to_string()),
            elapsed_seconds: (seconds * 1000.0).round() / 1000.0,
            lines_per_second: if seconds > 0.0 { (t.read as f64 / seconds).round() } else { 0.0 },
        }
    }
}

/// The end-of-run summary: the `-o json` object, and the lines on stderr.
#[derive(Debug, Serialize)]
struct Summary {
    file: String,
    format: &'static str,
    dry_run: bool,
    read: u64,
    valid: u64,
    valid_by_kind: BTreeMap<&'static str, u64>,
    applied: u64,
    replayed: u64,
    conflicts: u64,
    rejected: u64,
    invalid: u64,
    refused: u64,
    stopped_early: bool,
    max_errors: Option<u64>,
    /// The last physical line processed.
    last_line: u64,
    reject_file: Option<String>,
    elapsed_seconds: f64,
    lines_per_second: f64,
}

impl Summary {
    fn text(&self) -> Vec<String> {
        let timing = format!("{:.2}s, {} lines/s", self.elapsed_seconds, self.lines_per_second);
        let mut lines = vec![if self.dry_run {
            let kinds: Vec<String> =
                self.valid_by_kind.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
            let kinds =
                if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) };
            format!(
                "{}: dry run, nothing written: read {} lines: {} would be posted{kinds}, invalid {} ({timing})",
                self.file, self.read, self.valid, self.invalid
            )
        } else {
            format!(
                "{}: read {} lines: applied {}, replayed {}, conflicts {}, rejected {}, invalid {} \
                 ({timing})",
                self.file,
                self.read,
                self.applied,
                self.replayed,
                self.conflicts,
                self.rejected,
                self.invalid
            )
        }];
        if self.stopped_early {
            lines.push(format!(
                "stopped early after {} refused lines (--max-errors {}); lines after line {} \
                 were not processed",
                self.refused,
                self.max_errors.unwrap_or_default(),
                self.last_line
            ));
        }
        if let (Some(path), true) = (&self.reject_file, self.refused > 0) {
            lines.push(format!("{} refused lines written to {path}", self.refused));
        }
        lines
    }
}

/// The progress bar on stderr, drawn only when stderr is a terminal and `-q` was not given.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(ctx: &Context, len: Option<u64>) -> Progress {
        if ctx.ui.quiet || !io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let (bar, template) = match len {
            Some(len) => (
                ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()),
                "{spinner} {wide_bar} {percent:>3}% {msg} [{elapsed}, about {eta} left]",
            ),
            None => (
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
                "{spinner} {msg} [{elapsed}]",
            ),
        };
        bar.set_style(ProgressStyle::with_template(template).expect("a valid progress template"));
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar: Some(bar) }
    }

    fn update(&self, tally: &Tally, position: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            bar.set_message(format!("{} lines, {} refused", tally.read, tally.refused()));
        }
    }

    /// Prints a line on stderr without tearing the bar.
    fn println(&self, line: &str) {
        let line = escape(line);
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

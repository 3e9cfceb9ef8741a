//! Where settings come from: flags, then the environment, then a `.env` file in the current
//! directory, then defaults. Also the small value parsers that flags share.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, NaiveDate, Utc};
use idem_core::{Operator, StoreOptions};

use crate::cli::{GlobalArgs, OutputFormat};
use crate::exit::{CONFIG, Failure};

/// Loads `.env` from the current directory before flags are parsed, so that its values can fill
/// in flags that read the environment; a `--no-dotenv` anywhere on the line skips it. A missing
/// file is normal; an unreadable or malformed one is reported on stderr and otherwise ignored.
pub fn load_dotenv(args: &[OsString]) {
    if args.iter().any(|a| a == "--no-dotenv") {
        return;
    }
    match dotenvy::from_path(".env") {
        Ok(()) => {}
        Err(dotenvy::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("wmsctl: warning: ignoring .env: {e}"),
    }
}

/// The database URL: `--database-url` or `WMS_DATABASE_URL`, else `DATABASE_URL`, else the
/// default SQLite file.
pub fn database_url(global: &GlobalArgs) -> Result<String> {
    if let Some(url) = global.database_url.as_deref().filter(|u| !u.is_empty()) {
        return Ok(url.to_owned());
    }
    if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        return Ok(url);
    }
    let path = default_database_path().ok_or_else(|| {
        Failure::new(
            CONFIG,
            "config",
            "no database configured and no home directory to put the default one in; \
             set WMS_DATABASE_URL or pass --database-url",
        )
    })?;
    Ok(format!("sqlite://{}", path.display()))
}

/// `text` with the password of every URL in it masked, for text that may quote a URL anywhere
/// (a panic message): each word that contains `://` goes through [`idem_core::redact_url`].
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let word_start = rest[..start]
            .rfind(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '(' | '<'))
            .map_or(0, |i| i + 1);
        let word_end = rest[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ')' | '>'))
            .map_or(rest.len(), |i| start + i);
        out.push_str(&rest[..word_start]);
        out.push_str(&idem_core::redact_url(&rest[word_start..word_end]));
        rest = &rest[word_end..];
    }
    out.push_str(rest);
    out
}

/// `$XDG_DATA_HOME/wmsctl/wms.db`, else `~/.local/share/wmsctl/wms.db`.
pub fn default_database_path() -> Option<PathBuf> {
    let absolute = |v: OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .and_then(absolute)
        .or_else(|| std::env::var_os("HOME").and_then(absolute).map(|h| h.join(".local/share")))?;
    Some(data_home.join("wmsctl").join("wms.db"))
}

/// The operator: `--user` or `WMS_USER`, else the login name.
pub fn operator(global: &GlobalArgs) -> Result<Operator> {
    if let Some(requested) = requested_operator(global)? {
        return Ok(requested);
    }
    let name = login_name().ok_or_else(|| {
        Failure::new(CONFIG, "config", "cannot tell the login name; pass --user or set WMS_USER")
    })?;
    Ok(Operator::parse(&name)?)
}

/// The operator named by `--user` or `WMS_USER`, if either is set.
pub fn requested_operator(global: &GlobalArgs) -> Result<Option<Operator>> {
    match global.user.as_deref().filter(|u| !u.is_empty()) {
        Some(name) => Ok(Some(Operator::parse(name)?)),
        None => Ok(None),
    }
}

fn login_name() -> Option<String> {
    for var in ["USER", "LOGNAME"] {
        if let Some(name) = std::env::var(var).ok().filter(|n| !n.is_empty()) {
            return Some(name);
        }
    }
    // Cron and CI often run without USER: look the process owner up in the password file.
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").ok()?.uid().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)? == uid).then(|| name.to_owned())
    })
}

pub fn store_options(global: &GlobalArgs) -> StoreOptions {
    StoreOptions {
        max_connections: 1,
        connect_timeout: global.connect_timeout,
        busy_budget: global.busy_timeout,
    }
}

/// The output format: the flag, else a table on a terminal and plain lines when piped.
pub fn output_format(global: &GlobalArgs) -> OutputFormat {
    global.output.unwrap_or_else(|| {
        if std::io::stdout().is_terminal() { OutputFormat::Table } else { OutputFormat::Plain }
    })
}

/// Reads durations such as `90s`, `15m`, `24h`, `7d`, `2w` or `1h30m`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let rule = || format!("{raw:?} is not a duration; write it like 30s, 15m, 24h or 7d");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in raw.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(rule()),
        };
        let n: u64 = digits.parse().map_err(|_| rule())?;
        total = n.checked_mul(unit).and_then(|s| total.checked_add(s)).ok_or_else(rule)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(rule());
    }
    Ok(Duration::from_secs(total))
}

/// Reads a signed delta such as `-3` or `+5`.
pub fn parse_delta(raw: &str) -> Result<i64, String> {
    raw.strip_prefix('+')
        .unwrap_or(raw)
        .parse()
        .map_err(|_| format!("{raw:?} is not a whole number; write it like -3 or +5"))
}

/// Reads `--since`: a duration ago (`24h`), a date (`2026-12-01`) or an RFC 3339 time.
pub fn parse_since(raw: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(ago) = parse_duration(raw) {
        let ago = chrono::TimeDelta::from_std(ago).map_err(|e| e.to_string())?;
        return Ok(Utc::now() - ago);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(day) = NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(format!(
        "{raw:?} is not a time; write a duration ago like 24h, a date like 2026-12-01, or an RFC 3339 time"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "0s", "h", "10", "5x", "-5m", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deltas_and_since() {
        assert_eq!(parse_delta("+5"), Ok(5));
        assert_eq!(parse_delta("-3"), Ok(-3));
        assert!(parse_delta("3.5").is_err());
        assert!(parse_since("2026-12-01").is_ok());
        assert!(parse_since("2026-12-01T10:00:00Z").is_ok());
        assert!(parse_since("yesterday").is_err());
        let hour_ago = parse_since("1h").unwrap();
        assert!((Utc::now() - hour_ago).num_minutes() == 60);
    }

    #[test]
    fn urls_in_free_text_lose_their_passwords() {
        let text = "connecting to \"postgres://wms:pa%20ss@db/wms\" failed; \
                    retry postgres://u:Secret-1@h:5432/d?sslmode=require (or sqlite:///tmp/x.db)";
        let masked = redact_urls(text);
        assert!(!masked.contains("Secret-1"), "{masked}");
        assert!(masked.contains("postgres://u:****@h:5432/d?sslmode=require"), "{masked}");
        assert!(masked.contains("(or sqlite:///tmp/x.db)"), "{masked}");
        assert!(
            masked.starts_with("connecting to \"postgres://wms:****@db/wms\" failed"),
            "{masked}"
        );
        assert!(!masked.contains("pa%20ss"), "{masked}");
        assert_eq!(redact_urls("no url here"), "no url here");
        assert_eq!(redact_urls("a://b:c@d e://f:g@h"), "a://b:****@d e://f:****@h");
    }
}

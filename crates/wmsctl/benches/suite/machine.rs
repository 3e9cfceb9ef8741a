//! The machine a run measured: figures only mean something next to the CPU, the core count, the
//! memory, the kernel and how busy the machine was.

use std::process::Command;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub date: String,
    /// The 1-minute load average when the run started: a busy, shared machine shows here.
    pub load_at_start: f64,
    pub sqlite3: String,
    pub psql: String,
}

impl Machine {
    pub fn describe(sqlite3: &str, psql: &str) -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
            .map_or_else(|| "unknown".to_owned(), |(_, model)| model.trim().to_owned());
        let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let load_at_start =
            read("/proc/loadavg").split_whitespace().next().and_then(|l| l.parse().ok());
        Machine {
            cpu,
            cores,
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            load_at_start: load_at_start.unwrap_or(0.0),
            sqlite3: version(sqlite3),
            psql: version(psql),
        }
    }

    /// One line for the top of the table.
    pub fn summary(&self) -> String {
        format!(
            "{} ({} cores), {} GiB, Linux {}, {}, load {:.1} at start; {}, {}",
            self.cpu,
            self.cores,
            self.memory_gib,
            self.kernel,
            self.date,
            self.load_at_start,
            self.sqlite3,
            self.psql
        )
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn version(program: &str) -> String {
    let output = Command::new(program).arg("--version").output();
    let text = output.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let words: Vec<&str> = text.split_whitespace().take(3).collect();
    match program.rsplit('/').next() {
        // `sqlite3 --version` prints the version first, then the date and the check-in.
        Some("sqlite3") => format!("sqlite3 {}", words.first().unwrap_or(&"?")),
        _ => words.join(" "),
    }
}

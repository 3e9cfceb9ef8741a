//! `keys generate`: fresh random keys, one a line, for scripts to post with.

use std::io::Write;

use anyhow::Result;
use idem_core::IdemKey;

use crate::commands::Context;
use crate::exit::OK;

pub fn run(ctx: &Context, count: u32) -> Result<u8> {
    let keys: Vec<String> = (0..count).map(|_| IdemKey::generate().to_string()).collect();
    if ctx.ui.is_json() {
        let rows: Vec<serde_json::Value> =
            keys.iter().map(|k| serde_json::json!({ "key": k })).collect();
        ctx.ui.list(&rows, &["key"], |_| Vec::new())?;
    } else {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for key in &keys {
            writeln!(out, "{key}")?;
        }
        out.flush()?;
    }
    Ok(OK)
}

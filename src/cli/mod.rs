//! The commands of the `kiln` binary. `main.rs` only parses arguments and maps errors to exit codes.

pub mod bench;
pub mod generate;
pub mod score;

use anyhow::{bail, Result};

/// Parses `"1 2 3"` or `"1,2,3"` into token ids.
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    let ids = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--ids: {s:?} is not a token id"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--ids: no token ids given");
    }
    Ok(ids)
}

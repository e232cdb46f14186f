//! The commands of the `kiln` binary. `main.rs` only parses arguments and maps errors to exit codes.

pub mod bench;
pub mod bench_attention;
pub mod bench_command;
pub mod bench_dashboard;
pub mod bench_train;
pub mod chat;
pub mod comm_check;
pub mod eval;
pub mod generate;
pub mod plot;
pub mod runs;
pub mod score;

use anyhow::{bail, Result};
use std::path::Path;

/// One line describing what `kiln prepare` did.
pub fn prepare_summary(s: &crate::data::prepare::PrepareSummary, out: &Path) -> String {
    let i = &s.index;
    if s.skipped {
        return format!(
            "{}: up to date ({} documents, {} tokens)",
            out.display(),
            i.train.documents + i.val.documents,
            i.train.tokens + i.val.tokens
        );
    }
    format!(
        "{}: {} documents ({} train / {} val), {} tokens ({} train / {} val) from {} files in {:.1} s ({:.1} MB/s)",
        out.display(),
        i.train.documents + i.val.documents,
        i.train.documents,
        i.val.documents,
        i.train.tokens + i.val.tokens,
        i.train.tokens,
        i.val.tokens,
        i.inputs.len(),
        s.secs,
        s.input_bytes as f64 / 1e6 / s.secs.max(1e-9)
    )
}

/// A duration as `1h02m` or `3m07s` (ETAs in headless lines and the dashboard).
pub fn eta(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Parses `"1 2 3"` or `"1,2,3"` into token ids.
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    let ids = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().map_err(|_| anyhow::anyhow!("--ids: {s:?} is not a token id")))
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--ids: no token ids given");
    }
    Ok(ids)
}

/// Where a command runs its model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn parse(name: &str) -> anyhow::Result<Device> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => anyhow::bail!("--device {other:?}: expected cpu or cuda"),
        }
    }
}

/// Calls `$body` with `$b` bound to the backend `$device` names: one code path for every backend.
#[macro_export]
macro_rules! on_device {
    ($device:expr, |$b:ident| $body:expr) => {
        match $crate::cli::Device::parse($device)? {
            $crate::cli::Device::Cpu => {
                let $b = $crate::backend::cpu::Cpu::new();
                $body
            }
            $crate::cli::Device::Cuda => {
                let $b = $crate::backend::cuda::Cuda::open(0)?;
                $body
            }
        }
    };
}

/// A count that must be at least 1 (a benchmark of nothing is a mistake, not a request).
pub fn positive(flag: &str, n: usize) -> anyhow::Result<usize> {
    if n == 0 {
        anyhow::bail!("{flag} must be at least 1");
    }
    Ok(n)
}

/// Sampling flags a model can use: `top_p` in (0, 1], a finite temperature of at least 0.
pub fn check_sampling(temperature: f32, top_p: f32) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        anyhow::bail!("--top-p must be in (0, 1]");
    }
    if temperature < 0.0 || !temperature.is_finite() {
        anyhow::bail!("--temperature must be a non-negative number");
    }
    Ok(())
}

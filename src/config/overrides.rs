//! `--set section.key=value`: one key of the TOML document per override, and which override an
//! error is about (so that it blames the command line, not the file).

use anyhow::{bail, Context, Result};

/// Applies one `section.key=value` override to a parsed TOML document. The value is parsed as a
/// TOML value; a bare word that is not valid TOML is taken as a string (`--set model.init=runs/a`).
/// One `--set` sets one key: a value that is more than one TOML value (`1e-3\nx=1`) or a whole
/// section (`optim={lr=1}`, which would reset the section's other keys) is refused.
pub fn apply_set(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, value) =
        assignment.split_once('=').with_context(|| format!("--set {assignment:?}: expected section.key=value"))?;
    let path: Vec<&str> = key.trim().split('.').map(str::trim).collect();
    if path.iter().any(|p| p.is_empty()) {
        bail!("--set {assignment:?}: bad key {key:?}");
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => {
            let v = t.remove("v").expect("parsed a table with key v");
            if !t.is_empty() {
                bail!("--set {assignment:?}: the value must be one TOML value (one --set sets one key)");
            }
            v
        }
        Err(_) if value.contains(['\n', '\r']) => {
            bail!("--set {assignment:?}: the value must be one TOML value on one line")
        }
        Err(_) => toml::Value::String(value.to_string()),
    };
    let mut table = doc;
    for part in &path[..path.len() - 1] {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().with_context(|| format!("--set {assignment:?}: {part} is not a section"))?;
    }
    let last = path[path.len() - 1];
    if value.is_table() || table.get(last).is_some_and(toml::Value::is_table) {
        bail!("--set {assignment:?}: {key} is a section; set one key at a time (--set {key}.KEY=VALUE)");
    }
    table.insert(last.to_string(), value);
    Ok(())
}

/// The `--set` whose key a deserialization error at `path` (e.g. `optim.lr`) is about, if any:
/// the value came from the command line, so the error must not blame the file.
pub(super) fn set_behind<'a>(sets: &'a [String], path: &str) -> Option<&'a String> {
    sets.iter().rev().find(|s| {
        s.split_once('=').is_some_and(|(k, _)| {
            let k: Vec<&str> = k.trim().split('.').map(str::trim).collect();
            let k = k.join(".");
            path == k || path.starts_with(&format!("{k}.")) || path.starts_with(&format!("{k}["))
        })
    })
}

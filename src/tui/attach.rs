//! `kiln attach RUN_DIR`: the dashboard of a job running elsewhere (another terminal, a detached
//! run, a dropped SSH session), over the run's Unix socket, with history replayed from
//! metrics.jsonl. Quitting the viewer never stops training unless asked (`q` then `s`).

use super::app::App;
use super::{inbox, term, theme};
use crate::config::RunConfig;
use crate::train::events::Event;
use crate::train::socket::connect;
use anyhow::Result;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

pub fn attach(run_dir: &Path) -> Result<()> {
    let cfg = RunConfig::load(&run_dir.join("config.toml"), &[])?;
    let (stream, _) = connect(run_dir)?;
    let title = format!("{} (attached)", run_dir.display());
    let mut app = App::new(title, cfg.train.max_steps, theme::themes(theme::ColorMode::detect()), term::utf8_locale());
    app.run_dir = Some(run_dir.to_path_buf());
    app.leave_on_hangup = true;
    app.replay_history(run_dir);
    let (feed, inbox) = inbox::channel();
    let reader = stream.try_clone()?;
    // The run's events until its socket closes; dropping the feed then ends the dashboard.
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if let Ok(e) = serde_json::from_str::<Event>(&line) {
                if !feed.send(e) {
                    return;
                }
            }
        }
    });
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<crate::train::events::Command>();
    let mut writer = stream;
    std::thread::spawn(move || {
        for c in cmd_rx {
            if writeln!(writer, "{}", c.wire()).is_err() {
                return;
            }
        }
    });
    term::run(app, inbox, cmd_tx)?;
    Ok(())
}

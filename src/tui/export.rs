//! `x`: the current window of the run as a PNG in the run directory, rendered by `kiln plot`'s
//! renderer on its own thread (a long run's plot takes a moment the dashboard must not freeze for).

use super::app::App;

impl App {
    /// Starts rendering the current window to `RUN_DIR/plot-step-N.png`; `done` gets the line for
    /// the event log when it ends, from the export's thread (the dashboard passes it to its inbox,
    /// and then to `export_done`).
    pub fn export(&mut self, done: impl FnOnce(String) + Send + 'static) {
        if self.exporting {
            self.note("export: the previous one is still running".into());
            return;
        }
        let Some(dir) = self.run_dir.clone() else {
            self.note("export: no run directory known".into());
            return;
        };
        let from = self.visible().first().map_or(0, |p| p.step);
        let step = self.points.last().map_or(0, |p| p.step);
        let out = dir.join(format!("plot-step-{step:08}.png"));
        let reply = Reply(Some(done));
        let job = std::thread::Builder::new().name("kiln-export".into()).spawn(move || {
            reply.send(match crate::cli::plot::plot(&dir, &out, from) {
                Ok(()) => format!("exported {}", out.display()),
                Err(e) => format!("export failed: {e:#}"),
            })
        });
        match job {
            Ok(_) => self.exporting = true,
            Err(e) => self.note(format!("export failed: cannot start its thread ({e})")),
        }
    }

    /// The export's line, once it has ended.
    pub fn export_done(&mut self, line: String) {
        self.exporting = false;
        self.note(line);
    }
}

/// The export's one reply, sent even if its thread panics, so the dashboard never waits forever
/// for an export that has ended.
struct Reply<F: FnOnce(String)>(Option<F>);

impl<F: FnOnce(String)> Reply<F> {
    fn send(mut self, line: String) {
        if let Some(done) = self.0.take() {
            done(line);
        }
    }
}

impl<F: FnOnce(String)> Drop for Reply<F> {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done("export failed: its thread ended early".into());
        }
    }
}

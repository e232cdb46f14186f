//! The terminal loop: the screen (ratatui's raw mode and alternate screen), and one inbox that
//! engine events, keys and finished exports arrive on. The loop waits on it with a timeout for
//! its next frame. If the terminal goes away (SIGHUP, a write fails), the loop stops drawing and
//! keeps taking events, so training continues headless.

use super::actions::Effect;
use super::app::App;
use super::inbox::{Inbox, UiMsg};
use super::input::Input;
use super::view::render;
use crate::train::events::Command;
use anyhow::{Context, Result};
use ratatui::crossterm::event::{Event as TermEvent, KeyEventKind};
use ratatui::DefaultTerminal;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// True when the locale promises UTF-8 (braille charts); otherwise the charts use ASCII dots.
pub fn utf8_locale() -> bool {
    utf8_locale_from(|k| std::env::var(k).ok())
}

/// `utf8_locale` over any variable lookup: the first of LC_ALL, LC_CTYPE, LANG that is set and not
/// empty decides, as POSIX orders them.
pub fn utf8_locale_from(var: impl Fn(&str) -> Option<String>) -> bool {
    ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .filter_map(|k| var(k))
        .find(|v| !v.is_empty())
        .is_some_and(|v| v.to_ascii_lowercase().replace('-', "").contains("utf8"))
}

/// Lowers this (the dashboard's) thread to nice 10, so that when the cores are busy training, a
/// redraw waits for a gap instead of preempting a worker that the rest of the step is waiting on.
/// Only this thread changes: the engine's threads already exist (the input thread, started after
/// this, inherits it). Failing to lower it is harmless.
fn yield_to_training() {
    // SAFETY: gettid and setpriority have no memory-safety preconditions.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Redraw at least this often even when nothing happened (the clock in the ETA moves).
const IDLE_REDRAW: Duration = Duration::from_secs(1);
/// Engine events redraw at most this often (keys redraw at once): a fast run emits a step every few
/// milliseconds, and drawing each would take CPU from training.
const EVENT_REDRAW: Duration = Duration::from_millis(250);

/// Raw mode, the alternate screen and a terminal to draw on: ratatui's `try_init`, with our own
/// panic hook in place of the one it installs. Its hook restores through `ratatui::restore`, which
/// reports a failure with `eprintln!`; on a terminal that hung up that write fails and panics
/// inside the hook, which aborts the process, and with it a run meant to go on headless.
fn enter() -> Result<DefaultTerminal> {
    let previous = std::panic::take_hook();
    let terminal = ratatui::try_init();
    match terminal {
        Ok(terminal) => {
            std::panic::set_hook(Box::new(move |info| {
                leave();
                previous(info);
            }));
            Ok(terminal)
        }
        Err(e) => {
            // Raw mode may be on; nothing was drawn, so no screen to leave.
            let _ = ratatui::crossterm::terminal::disable_raw_mode();
            std::panic::set_hook(previous);
            Err(e).context("the dashboard needs a terminal, and this process has none")
        }
    }
}

/// Back to the shell's screen; a terminal that is gone has nothing to restore.
fn leave() {
    let _ = ratatui::try_restore();
}

/// When the next frame is due: at once after input, at most every EVENT_REDRAW after engine
/// events, every IDLE_REDRAW otherwise.
struct Frames {
    last: Instant,
    due: Instant,
}

impl Frames {
    fn new() -> Frames {
        let now = Instant::now();
        Frames { last: now, due: now }
    }

    fn input(&mut self) {
        self.due = Instant::now();
    }

    fn event(&mut self) {
        self.due = self.due.min(self.last + EVENT_REDRAW);
    }

    fn drawn(&mut self) {
        self.last = Instant::now();
        self.due = self.last + IDLE_REDRAW;
    }

    /// How long until the next frame (zero: now).
    fn wait(&self) -> Duration {
        self.due.saturating_duration_since(Instant::now())
    }
}

/// Runs the dashboard until the engine's events end (training ended or stopped) or the user
/// detaches; returns whether they detached. An idle dashboard wakes once a second, to draw.
pub fn run(mut app: App, inbox: Inbox, commands: Sender<Command>) -> Result<bool> {
    yield_to_training();
    let mut terminal = enter()?;
    let detached = Input::start(inbox.tx.clone()).map(|input| {
        let detached = serve(&mut app, &mut terminal, &inbox, &commands);
        drop(input); // stop reading before the shell has the terminal back
        detached
    });
    leave();
    detached
}

/// The loop itself: one message at a time, a frame when one is due. Returns whether the user
/// detached.
fn serve(app: &mut App, terminal: &mut DefaultTerminal, inbox: &Inbox, commands: &Sender<Command>) -> bool {
    let mut frames = Frames::new();
    let mut drawing = true;
    loop {
        if drawing && frames.wait().is_zero() {
            if terminal.draw(|f| render(f, app)).is_err() && hung_up(app, &mut drawing) {
                return true;
            }
            frames.drawn();
        }
        // Without a terminal there is nothing to draw: wait for the next event, however long.
        let msg = if drawing {
            match inbox.rx.recv_timeout(frames.wait()) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        } else {
            match inbox.rx.recv() {
                Ok(msg) => msg,
                Err(_) => return false,
            }
        };
        match msg {
            UiMsg::Engine(e) => {
                app.on_event(&e);
                frames.event();
            }
            UiMsg::EngineGone => return false,
            UiMsg::Exported(line) => {
                app.export_done(line);
                frames.event();
            }
            UiMsg::TerminalGone => {
                if hung_up(app, &mut drawing) {
                    return true;
                }
            }
            UiMsg::Input(TermEvent::Key(k)) if k.kind == KeyEventKind::Press => {
                frames.input();
                let effects = app.on_key(k);
                if carry_out(app, effects, inbox, commands) {
                    return true;
                }
            }
            UiMsg::Input(TermEvent::Resize(..)) => frames.input(),
            UiMsg::Input(_) => {}
        }
    }
}

/// The terminal is gone (SSH dropped, tmux pane killed): the engine's own dashboard stops drawing
/// and keeps taking events, so training goes on headless; an attached viewer leaves. True when the
/// dashboard ends here.
fn hung_up(app: &App, drawing: &mut bool) -> bool {
    *drawing = false;
    app.leave_on_hangup
}

/// Does what a key asked for; true when it asked to detach (after the rest, so a pause the chat
/// pane took is given back first).
fn carry_out(app: &mut App, effects: Vec<Effect>, inbox: &Inbox, commands: &Sender<Command>) -> bool {
    let mut detach = false;
    for effect in effects {
        match effect {
            Effect::Send(c) => {
                let _ = commands.send(c);
            }
            Effect::Export => {
                let tx = inbox.tx.clone();
                app.export(move |line| {
                    let _ = tx.send(UiMsg::Exported(line));
                });
            }
            Effect::Detach => detach = true,
        }
    }
    detach
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_locale_decides_braille_or_ascii_charts() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            utf8_locale_from(move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
        };
        assert!(!env(&[]));
        assert!(env(&[("LANG", "en_US.UTF-8")]));
        assert!(env(&[("LANG", "C.utf8")]));
        assert!(!env(&[("LANG", "C")]));
        // LC_ALL overrides LC_CTYPE, which overrides LANG; an empty one is as if unset.
        assert!(!env(&[("LC_ALL", "C"), ("LANG", "en_US.UTF-8")]));
        assert!(env(&[("LC_CTYPE", "en_US.UTF-8"), ("LANG", "C")]));
        assert!(env(&[("LC_ALL", ""), ("LC_CTYPE", "de_DE.utf-8"), ("LANG", "C")]));
    }
}

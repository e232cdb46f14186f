//! The terminal loop: raw mode + alternate screen, engine events drained every frame, keys turned
//! into actions. If the terminal goes away (a write fails, e.g. after SIGHUP), the loop stops
//! drawing and keeps draining events, so training continues headless.

use super::app::{App, Overlay};
use super::chat::ChatKey;
use super::keymap::{action_for, Action};
use super::view::render;
use crate::train::events::{Command, Event};
use anyhow::{Context, Result};
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::prelude::CrosstermBackend;
use ratatui::Terminal;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
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

fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen);
}

enum Input {
    Ready,
    Idle,
    /// The terminal hung up (SSH dropped, tmux pane killed).
    Gone,
}

/// Waits up to `ms` for a key on the terminal (standard input). Asked of the kernel directly:
/// crossterm's own poll spins on a terminal that hung up instead of reporting it.
fn wait_for_input(ms: i32) -> Input {
    let mut fd = libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, and its count.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    if n < 0 {
        return Input::Idle; // interrupted by a signal: look again next round
    }
    if fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        return Input::Gone;
    }
    if fd.revents & libc::POLLIN != 0 {
        Input::Ready
    } else {
        Input::Idle
    }
}

/// Lowers this (the dashboard's) thread to nice 10, so that when the cores are busy training, a
/// redraw waits for a gap instead of preempting a worker that the rest of the step is waiting on.
/// Only this thread changes: the engine's threads already exist. Failing to lower it is harmless.
fn yield_to_training() {
    // SAFETY: gettid and setpriority have no memory-safety preconditions.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// How long the loop sleeps waiting for a key; engine events are picked up when it wakes, and are
/// drawn at most every EVENT_REDRAW anyway, so waking more often would only cost CPU.
const KEY_WAIT_MS: i32 = 250;

/// Redraw at least this often even when nothing happened (the clock in the ETA moves).
const IDLE_REDRAW: Duration = Duration::from_secs(1);
/// Engine events redraw at most this often (keys redraw at once): a fast run emits a step every few
/// milliseconds, and drawing each would take CPU from training.
const EVENT_REDRAW: Duration = Duration::from_millis(250);

/// The commands a key press asks for, given the pane or overlay that has the keyboard.
fn on_key(app: &mut App, code: KeyCode, ctrl: bool) -> Vec<Command> {
    let ch = match code {
        KeyCode::Char(c) if !ctrl => Some(c),
        _ => None,
    };
    if app.chat.open && app.overlay != Overlay::QuitPrompt {
        let key = match code {
            KeyCode::Enter => ChatKey::Enter,
            KeyCode::Backspace => ChatKey::Backspace,
            KeyCode::Esc => ChatKey::Esc,
            KeyCode::Tab => ChatKey::Tab,
            _ => match ch {
                Some(c) => ChatKey::Char(c),
                None => return Vec::new(),
            },
        };
        return app.on_chat_key(key);
    }
    if app.overlay == Overlay::QuitPrompt {
        return app.on_quit_key(if code == KeyCode::Esc { None } else { ch });
    }
    match code {
        KeyCode::Esc => {
            app.overlay = Overlay::None;
            Vec::new()
        }
        KeyCode::Tab => app.on_action(Action::Chat),
        _ => ch.and_then(action_for).map(|a| app.on_action(a)).unwrap_or_default(),
    }
}

/// Runs the dashboard until the engine's event channel closes (training ended or stopped) or the
/// user detaches; returns whether they detached. The screen is redrawn only when something changed
/// (an event, a key, a resize) or once a second, so an idle dashboard costs next to nothing.
pub fn run(mut app: App, events: Receiver<Event>, commands: Sender<Command>) -> Result<bool> {
    yield_to_training();
    enable_raw_mode().context("the dashboard needs a terminal, and this process has none")?;
    execute!(std::io::stdout(), EnterAlternateScreen)?;
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        default_hook(info);
    }));
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut engine_done = false;
    let mut drawing = true;
    // What changed since the last frame: engine events (drawn at most every EVENT_REDRAW) or the
    // user's own input (drawn at once).
    let mut events_changed = true;
    let mut input_changed = true;
    let mut last_draw = Instant::now();
    while !engine_done && !app.detached {
        loop {
            match events.try_recv() {
                Ok(e) => {
                    app.on_event(&e);
                    events_changed = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    engine_done = true;
                    break;
                }
            }
        }
        if app.export_requested {
            app.export();
        }
        events_changed |= app.poll_export();
        let since = last_draw.elapsed();
        if drawing && (input_changed || (events_changed && since >= EVENT_REDRAW) || since >= IDLE_REDRAW) {
            if terminal.draw(|f| render(f, &app)).is_err() {
                drawing = false; // the terminal is gone: keep training, headless
                app.detached |= app.leave_on_hangup;
            }
            (events_changed, input_changed) = (false, false);
            last_draw = Instant::now();
        }
        if !drawing {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        match wait_for_input(KEY_WAIT_MS) {
            Input::Gone => {
                // The terminal hung up: the engine's own dashboard keeps training headless; an
                // attached viewer just leaves.
                drawing = false;
                app.detached |= app.leave_on_hangup;
            }
            Input::Idle => {}
            // crossterm reads every pending byte at once and queues the events: take them all
            // now, or the queued ones would wait for the next key press.
            Input::Ready => {
                while event::poll(Duration::ZERO).unwrap_or(false) {
                    match event::read() {
                        Ok(TermEvent::Key(k)) if k.kind == KeyEventKind::Press => {
                            let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
                            for c in on_key(&mut app, k.code, ctrl) {
                                let _ = commands.send(c);
                            }
                            input_changed = true;
                        }
                        Ok(TermEvent::Resize(..)) => input_changed = true,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        }
    }
    restore();
    Ok(app.detached)
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

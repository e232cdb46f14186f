//! The terminal loop: raw mode + alternate screen, engine events drained every frame, keys turned
//! into actions. If the terminal goes away (a write fails, e.g. after SIGHUP), the loop stops
//! drawing and keeps draining events, so training continues headless.

use super::app::{App, Overlay};
use super::keymap::action_for;
use super::view::render;
use crate::train::events::{Command, Event};
use anyhow::Result;
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::prelude::CrosstermBackend;
use ratatui::Terminal;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::Duration;

/// True when the locale promises UTF-8 (braille charts); otherwise the charts use ASCII dots.
pub fn utf8_locale() -> bool {
    ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.is_empty())
        .is_some_and(|v| v.to_ascii_lowercase().replace('-', "").contains("utf8"))
}

fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen);
}

/// Runs the dashboard until the engine's event channel closes (training ended or stopped) or the
/// user detaches; returns whether they detached.
pub fn run(mut app: App, events: Receiver<Event>, commands: Sender<Command>) -> Result<bool> {
    enable_raw_mode()?;
    execute!(std::io::stdout(), EnterAlternateScreen)?;
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        default_hook(info);
    }));
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut engine_done = false;
    let mut drawing = true;
    while !engine_done && !app.detached {
        loop {
            match events.try_recv() {
                Ok(e) => app.on_event(&e),
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
        if drawing && terminal.draw(|f| render(f, &app)).is_err() {
            drawing = false; // the terminal is gone: keep training, headless
        }
        if !drawing {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        if event::poll(Duration::from_millis(100)).unwrap_or(false) {
            if let Ok(TermEvent::Key(k)) = event::read() {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                let ch = match k.code {
                    KeyCode::Char(c) => Some(c),
                    _ => None,
                };
                let cmd = if app.overlay == Overlay::QuitPrompt {
                    app.on_quit_key(if k.code == KeyCode::Esc { None } else { ch })
                } else if k.code == KeyCode::Esc {
                    app.overlay = Overlay::None;
                    None
                } else {
                    ch.and_then(action_for).and_then(|a| app.on_action(a))
                };
                if let Some(c) = cmd {
                    let _ = commands.send(c);
                }
            }
        }
    }
    restore();
    Ok(app.detached)
}

//! What a key does. The pane or overlay that has the keyboard decides how a key is read (text in
//! the chat pane, the quit prompt's own keys, the key table otherwise); the result is a list of
//! effects for the terminal loop to carry out, so the state never holds requests for the loop.

use super::app::{App, Overlay, WINDOWS};
use super::chat::ChatKey;
use super::keymap::{action_for, Action};
use crate::train::events::Command;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// What the terminal loop does for a key, beyond the change to the dashboard's state.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// A command for the engine.
    Send(Command),
    /// Render the current window to `RUN_DIR/plot-step-N.png` (off the UI thread).
    Export,
    /// Leave this dashboard; training goes on.
    Detach,
}

fn send(commands: Vec<Command>) -> Vec<Effect> {
    commands.into_iter().map(Effect::Send).collect()
}

impl App {
    /// A key press, given the pane or overlay that has the keyboard. Releases and repeats reported
    /// by some terminals are not presses, and do nothing.
    pub fn on_key(&mut self, k: KeyEvent) -> Vec<Effect> {
        if k.kind != KeyEventKind::Press {
            return Vec::new();
        }
        let ch = match k.code {
            KeyCode::Char(c) if !k.modifiers.contains(KeyModifiers::CONTROL) => Some(c),
            _ => None,
        };
        if self.chat.open && self.overlay != Overlay::QuitPrompt {
            let key = match k.code {
                KeyCode::Enter => ChatKey::Enter,
                KeyCode::Backspace => ChatKey::Backspace,
                KeyCode::Esc => ChatKey::Esc,
                KeyCode::Tab => ChatKey::Tab,
                _ => match ch {
                    Some(c) => ChatKey::Char(c),
                    None => return Vec::new(),
                },
            };
            return send(self.on_chat_key(key));
        }
        if self.overlay == Overlay::QuitPrompt {
            return self.on_quit_key(if k.code == KeyCode::Esc { None } else { ch });
        }
        match k.code {
            KeyCode::Esc => {
                self.overlay = Overlay::None;
                Vec::new()
            }
            KeyCode::Tab => self.on_action(Action::Chat),
            _ => ch.and_then(action_for).map(|a| self.on_action(a)).unwrap_or_default(),
        }
    }

    /// Applies a key action from the table.
    pub fn on_action(&mut self, a: Action) -> Vec<Effect> {
        if self.overlay == Overlay::QuitPrompt {
            return Vec::new(); // the prompt takes its own keys (see `on_quit_key`)
        }
        match a {
            Action::TogglePause => return vec![Effect::Send(Command::TogglePause)],
            Action::Checkpoint => return vec![Effect::Send(Command::CheckpointNow)],
            Action::Sample => return vec![Effect::Send(Command::SampleNow)],
            Action::Eval => return vec![Effect::Send(Command::EvalNow)],
            Action::Chat => {
                self.overlay = Overlay::None;
                return send(self.open_chat());
            }
            Action::Export => return vec![Effect::Export],
            Action::LogY => self.log_y = !self.log_y,
            Action::WindowIn => self.window = self.window.saturating_sub(1),
            Action::WindowOut => self.window = (self.window + 1).min(WINDOWS.len() - 1),
            Action::XAxis => self.x_tokens = !self.x_tokens,
            Action::NextTheme => self.theme = (self.theme + 1) % self.themes.len(),
            Action::Help => self.overlay = if self.overlay == Overlay::Help { Overlay::None } else { Overlay::Help },
            Action::Quit => self.overlay = Overlay::QuitPrompt,
        }
        Vec::new()
    }

    /// Keys of the quit prompt: `s` checkpoint and stop, `d` detach (training goes on), Esc (or
    /// anything else) cancel. Leaving also gives back a pause the chat pane took.
    pub fn on_quit_key(&mut self, key: Option<char>) -> Vec<Effect> {
        self.overlay = Overlay::None;
        match key {
            Some('s') => vec![Effect::Send(Command::Stop)],
            Some('d') => {
                let mut effects = send(self.close_chat());
                effects.push(Effect::Detach);
                effects
            }
            _ => Vec::new(),
        }
    }
}

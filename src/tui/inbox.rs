//! The dashboard's one inbox: engine events, terminal input and finished exports all arrive on one
//! channel, so the loop (`term::run`) waits in one place, with a timeout for its next frame.

use crate::train::events::Event;
use ratatui::crossterm::event::Event as TermEvent;
use std::sync::mpsc::{Receiver, Sender};

pub enum UiMsg {
    /// From the engine: in the same process, or read from the run's socket.
    Engine(Event),
    /// The engine's events ended: training finished or stopped, or the socket closed.
    EngineGone,
    /// A key, a resize, ... from the input thread.
    Input(TermEvent),
    /// The terminal hung up (SSH dropped, tmux pane killed).
    TerminalGone,
    /// A plot export finished: the line for the event log.
    Exported(String),
}

/// The engine's side of the inbox. Dropping it says the engine is done; whoever forwards events
/// (the in-process sink, an attached viewer's socket reader) holds exactly one, so the dashboard
/// ends when that does.
pub struct EngineFeed(Sender<UiMsg>);

impl EngineFeed {
    /// False once the dashboard has gone.
    pub fn send(&self, e: Event) -> bool {
        self.0.send(UiMsg::Engine(e)).is_ok()
    }
}

impl Drop for EngineFeed {
    fn drop(&mut self) {
        let _ = self.0.send(UiMsg::EngineGone);
    }
}

/// The dashboard's side: messages in, and a sender for the threads it starts itself (terminal
/// input, exports).
pub struct Inbox {
    pub(super) tx: Sender<UiMsg>,
    pub(super) rx: Receiver<UiMsg>,
}

pub fn channel() -> (EngineFeed, Inbox) {
    let (tx, rx) = std::sync::mpsc::channel();
    (EngineFeed(tx.clone()), Inbox { tx, rx })
}

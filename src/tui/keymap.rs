//! Every key the dashboard understands, in one table: dispatch and the help screen both read it.
//! Letters only, so everything works through PuTTY and tmux.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    TogglePause,
    Checkpoint,
    Sample,
    Eval,
    Chat,
    LogY,
    WindowIn,
    WindowOut,
    XAxis,
    Export,
    NextTheme,
    Help,
    Quit,
}

pub struct Binding {
    pub key: char,
    pub action: Action,
    pub help: &'static str,
}

pub const KEYMAP: &[Binding] = &[
    Binding { key: 'p', action: Action::TogglePause, help: "pause / resume at the next step boundary" },
    Binding { key: 'c', action: Action::Checkpoint, help: "checkpoint now" },
    Binding { key: 's', action: Action::Sample, help: "sample from the configured prompts now" },
    Binding { key: 'e', action: Action::Eval, help: "run the held-out eval now" },
    Binding {
        key: 'g',
        action: Action::Chat,
        help: "chat with the current weights (also Tab; training pauses meanwhile)",
    },
    Binding { key: 'l', action: Action::LogY, help: "log-scale loss axis" },
    Binding { key: '+', action: Action::WindowIn, help: "show fewer recent steps" },
    Binding { key: '-', action: Action::WindowOut, help: "show more steps (up to all)" },
    Binding { key: 'a', action: Action::XAxis, help: "x axis: steps or tokens" },
    Binding { key: 'x', action: Action::Export, help: "export the current view to RUN_DIR/plot-step-N.png" },
    Binding { key: 't', action: Action::NextTheme, help: "next theme" },
    Binding { key: '?', action: Action::Help, help: "this help" },
    Binding { key: 'q', action: Action::Quit, help: "quit (asks: s = checkpoint and stop, d = detach, Esc = cancel)" },
];

pub fn action_for(key: char) -> Option<Action> {
    KEYMAP.iter().find(|b| b.key == key).map(|b| b.action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_dispatch() {
        for (i, a) in KEYMAP.iter().enumerate() {
            assert!(KEYMAP[i + 1..].iter().all(|b| b.key != a.key), "duplicate key {}", a.key);
            assert_eq!(action_for(a.key), Some(a.action));
        }
        assert_eq!(action_for('z'), None);
    }
}

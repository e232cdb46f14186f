//! The terminal dashboard. State (`app`) is fed by engine events; `view` is a pure function of that
//! state; keys become actions through one table (`keymap`) that also renders the help screen, and
//! actions return effects (`actions`) for the loop (`term`) to carry out. The engine runs on its
//! own thread and never waits on rendering: its events, the terminal's input (`input`, a thread of
//! its own) and finished exports arrive on one channel (`inbox`); commands go back over another,
//! the same protocol headless mode consumes.

pub mod actions;
pub mod app;
pub mod attach;
pub mod chat;
pub mod chat_view;
pub mod export;
pub mod inbox;
pub mod input;
pub mod keymap;
pub mod term;
pub mod theme;
pub mod view;

//! The terminal dashboard. State (`app`) is fed by engine events; `view` is a pure function of that
//! state; keys become actions through one table (`keymap`) that also renders the help screen.
//! The engine runs on its own thread and never waits on rendering: events arrive over a channel and
//! commands go back over another, the same protocol headless mode consumes.

pub mod app;
pub mod attach;
pub mod chat;
pub mod chat_view;
pub mod keymap;
pub mod term;
pub mod theme;
pub mod view;

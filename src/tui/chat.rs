//! The chat pane's state: a conversation with the weights being trained. Letters are text here,
//! so the pane has its own keys (Enter send, Esc stop the reply or leave, Tab back to the
//! dashboard) and slash commands for the sampling settings. By default training pauses while the
//! pane is open, so replies come from fixed weights at full speed; `/train` keeps it going.

use super::app::App;
use crate::chat::service::ChatRequest;
use crate::chat::Message;
use crate::train::events::{Command, Event};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatKey {
    Char(char),
    Enter,
    Backspace,
    Esc,
    Tab,
}

/// The pane's keys and commands, short enough for the footer at 80 columns.
pub const CHAT_HELP: &str = "Enter send · Esc stop/leave · Tab back · /temp /top-p /max /train /clear";

pub struct ChatPane {
    pub open: bool,
    pub input: String,
    pub messages: Vec<Message>,
    /// The id of the reply being streamed into the last message.
    pub pending: Option<u64>,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    /// Keep training while the pane is open (otherwise it pauses, and resumes on leaving).
    pub train_while_chatting: bool,
    /// This pane paused training and owes a resume when it closes.
    pub paused_by_chat: bool,
    /// Under the conversation: the last reply's figures, or what went wrong.
    pub status: String,
    /// Request ids: this viewer's random prefix plus a counter, so viewers never collide.
    session: u64,
    sent: u64,
}

impl Default for ChatPane {
    fn default() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let session = ((nanos as u64) ^ ((std::process::id() as u64) << 40)) & !0xFFFF;
        ChatPane {
            open: false,
            input: String::new(),
            messages: Vec::new(),
            pending: None,
            temperature: 0.8,
            top_p: 0.95,
            max_tokens: 128,
            train_while_chatting: false,
            paused_by_chat: false,
            status: String::new(),
            session,
            sent: 0,
        }
    }
}

impl App {
    /// Opens the chat pane; pauses training unless `/train` asked to keep it going.
    pub fn open_chat(&mut self) -> Vec<Command> {
        self.chat.open = true;
        self.hold_for_chat()
    }

    /// Leaves the pane, resuming training if opening it paused it. A reply still streaming goes on
    /// in the background and is there when the pane opens again.
    pub fn close_chat(&mut self) -> Vec<Command> {
        self.chat.open = false;
        if std::mem::take(&mut self.chat.paused_by_chat) {
            return vec![Command::SetPaused(false)];
        }
        Vec::new()
    }

    fn hold_for_chat(&mut self) -> Vec<Command> {
        if !self.chat.train_while_chatting && !self.paused && !self.chat.paused_by_chat {
            self.chat.paused_by_chat = true;
            return vec![Command::SetPaused(true)];
        }
        Vec::new()
    }

    pub fn on_chat_key(&mut self, key: ChatKey) -> Vec<Command> {
        let c = &mut self.chat;
        match key {
            ChatKey::Char(ch) => {
                c.input.push(ch);
                Vec::new()
            }
            ChatKey::Backspace => {
                c.input.pop();
                Vec::new()
            }
            ChatKey::Tab => self.close_chat(),
            ChatKey::Esc => match c.pending {
                Some(id) => {
                    c.status = "stopping…".into();
                    vec![Command::ChatStop(id)]
                }
                None => self.close_chat(),
            },
            ChatKey::Enter => {
                let line = std::mem::take(&mut c.input);
                if let Some(cmd) = line.trim().strip_prefix('/') {
                    return self.chat_command(cmd);
                }
                if line.trim().is_empty() {
                    return Vec::new();
                }
                if c.pending.is_some() {
                    c.input = line; // keep it for later
                    c.status = "a reply is still streaming: wait, or Esc to stop it".into();
                    return Vec::new();
                }
                c.messages.push(Message::new("user", &line));
                c.sent += 1;
                let id = c.session | c.sent;
                let req = ChatRequest {
                    id,
                    messages: c.messages.clone(),
                    temperature: c.temperature,
                    top_p: c.top_p,
                    max_tokens: c.max_tokens,
                };
                c.messages.push(Message::new("assistant", ""));
                c.pending = Some(id);
                c.status = "thinking…".into();
                vec![Command::Chat(req)]
            }
        }
    }

    /// `/temp T`, `/top-p P`, `/max N`, `/train`, `/clear`.
    fn chat_command(&mut self, cmd: &str) -> Vec<Command> {
        let c = &mut self.chat;
        let (word, arg) = cmd.split_once(' ').map_or((cmd, ""), |(w, a)| (w, a.trim()));
        let bad = |what: &str| format!("/{word}: {what}");
        match word {
            "temp" | "temperature" => match arg.parse::<f32>() {
                Ok(t) if (0.0..=5.0).contains(&t) => c.temperature = t,
                _ => c.status = bad("give a temperature from 0 (greedy) to 5"),
            },
            "top-p" | "top_p" => match arg.parse::<f32>() {
                Ok(p) if p > 0.0 && p <= 1.0 => c.top_p = p,
                _ => c.status = bad("give a probability above 0, at most 1"),
            },
            "max" => match arg.parse::<usize>() {
                Ok(n) if n > 0 => c.max_tokens = n,
                _ => c.status = bad("give a positive number of tokens"),
            },
            "clear" => {
                if c.pending.is_none() {
                    c.messages.clear();
                    c.status = "new conversation".into();
                }
            }
            "train" => {
                c.train_while_chatting = !c.train_while_chatting;
                if c.train_while_chatting {
                    if std::mem::take(&mut c.paused_by_chat) {
                        return vec![Command::SetPaused(false)];
                    }
                    return Vec::new();
                }
                return self.hold_for_chat();
            }
            _ => c.status = format!("unknown command /{word} ({CHAT_HELP})"),
        }
        Vec::new()
    }

    /// Chat events; those of other viewers' conversations are ignored.
    pub fn on_chat_event(&mut self, e: &Event) {
        let c = &mut self.chat;
        match e {
            Event::ChatToken { id, text } if c.pending == Some(*id) => {
                if let Some(m) = c.messages.last_mut() {
                    m.content.push_str(text);
                }
            }
            Event::ChatDone { id, step, tokens, tokens_per_s, ended, dropped } if c.pending == Some(*id) => {
                c.pending = None;
                if ended.starts_with("error") {
                    // Leave the failed turn out of the conversation, but keep the words typed.
                    if c.messages.last().is_some_and(|m| m.role == "assistant" && m.content.is_empty()) {
                        c.messages.pop();
                    }
                    if let Some(m) = c.messages.pop() {
                        c.input = m.content;
                    }
                    c.status = ended.clone();
                    return;
                }
                let dropped =
                    if *dropped > 0 { format!(" · {dropped} oldest messages left out to fit") } else { String::new() };
                c.status =
                    format!("{tokens} tokens · {tokens_per_s:.1} tok/s · weights of step {step} · {ended}{dropped}");
            }
            _ => {}
        }
    }
}

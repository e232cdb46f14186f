//! A conversation as prompt token ids: through the chat template when the tokenizer has one, plain
//! continuation otherwise; the oldest turns are dropped when it outgrows the model's context.

use super::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};

/// How a model wants its conversations written.
#[derive(Clone)]
pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub bos: u32,
    /// Tokens that end a reply: the model's EOS ids and the template's end-of-turn token.
    pub stop: Vec<u32>,
}

pub struct Prompt {
    pub ids: Vec<u32>,
    /// Oldest messages left out to fit the context.
    pub dropped: usize,
}

impl ChatFormat {
    pub fn new(tokenizer: Tokenizer, template: Option<ChatTemplate>, bos: u32, eos: &[u32]) -> ChatFormat {
        let mut stop = eos.to_vec();
        if let Some(id) = template.as_ref().and_then(|t| tokenizer.token_id(&t.eos_token)) {
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
        ChatFormat { tokenizer, template, bos, stop }
    }

    /// The text the model continues. With a template: the rendered conversation up to the
    /// assistant's turn. Without one (a base model): the turns as one running text, the reply
    /// continuing the user's words and each later user turn on a new line.
    pub fn text(&self, messages: &[Message]) -> Result<String> {
        if let Some(t) = &self.template {
            return t.render(messages, true);
        }
        let mut s = String::new();
        for (i, m) in messages.iter().filter(|m| m.role != "system").enumerate() {
            if i > 0 && m.role == "user" {
                s.push('\n');
            }
            s.push_str(&m.content);
        }
        Ok(s)
    }

    /// Token ids of `text`. BOS is prepended unless the template writes it itself or the
    /// tokenizer config turns it off (as `tokenizer(text)` does in transformers' chat pipeline).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let bos = match &self.template {
            Some(t) if !t.bos_token.is_empty() && text.starts_with(&t.bos_token) => None,
            Some(t) if !t.add_bos_token => None,
            _ => Some(self.bos),
        };
        self.tokenizer.encode(text, bos)
    }

    /// The prompt for `messages`, at most `budget` tokens: the oldest turns after a leading system
    /// message go first; the last message always stays.
    pub fn prompt(&self, messages: &[Message], budget: usize) -> Result<Prompt> {
        let keep_first = messages.first().is_some_and(|m| m.role == "system") as usize;
        let mut dropped = 0;
        loop {
            let mut kept: Vec<Message> = messages[..keep_first].to_vec();
            kept.extend_from_slice(&messages[keep_first + dropped..]);
            let ids = self.encode(&self.text(&kept)?)?;
            if ids.len() <= budget {
                return Ok(Prompt { ids, dropped });
            }
            if keep_first + dropped + 1 >= messages.len() {
                bail!("the message is {} tokens; the model's context leaves room for {budget}", ids.len());
            }
            dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> ChatFormat {
        ChatFormat::new(Tokenizer::llama2(), None, 1, &[2])
    }

    #[test]
    fn plain_continuation_runs_the_turns_together() {
        let f = plain();
        let m = [
            Message::new("user", "Once upon a time"),
            Message::new("assistant", " there was"),
            Message::new("user", "The end"),
        ];
        assert_eq!(f.text(&m).unwrap(), "Once upon a time there was\nThe end");
        assert_eq!(f.encode("Hi").unwrap()[0], 1, "BOS first");
    }

    #[test]
    fn oldest_turns_are_dropped_to_fit() {
        let f = plain();
        let long = "word ".repeat(40);
        let m = [Message::new("user", &long), Message::new("assistant", &long), Message::new("user", "short")];
        let p = f.prompt(&m, 30).unwrap();
        assert_eq!(p.dropped, 2);
        assert!(p.ids.len() <= 30);
        let e = f.prompt(&[Message::new("user", &long)], 10).err().unwrap();
        assert!(e.to_string().contains("context"), "{e}");
    }
}

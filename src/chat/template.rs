//! Chat templates as Hugging Face tokenizers ship them: the Jinja `chat_template` of
//! tokenizer_config.json, rendered the way transformers' `apply_chat_template` renders it
//! (trim_blocks and lstrip_blocks on, Python string methods, `raise_exception`, `bos_token` and
//! `eos_token` in scope).

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    template: String,
    pub bos_token: String,
    pub eos_token: String,
    /// tokenizer_config.json's `add_bos_token` (true when absent, as for Llama tokenizers).
    pub add_bos_token: bool,
}

/// A special token as tokenizer_config.json writes it: a string, or an AddedToken object.
fn token_string(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The chat template of a tokenizer_config.json, `None` when it has none. `source` names the
    /// file in errors.
    pub fn from_tokenizer_config(bytes: &[u8], source: &str) -> Result<Option<ChatTemplate>> {
        let cfg: Value = serde_json::from_slice(bytes).map_err(|e| anyhow!("{source}: not valid JSON ({e})"))?;
        let template = match cfg.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            // Several named templates: the one called "default", else the first.
            Some(Value::Array(list)) => {
                let named = |n: &str| list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(n));
                named("default")
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("{source}: chat_template is a list without a usable template"))?
                    .to_string()
            }
            Some(_) => return Err(anyhow!("{source}: chat_template is neither a string nor a list")),
        };
        let t = ChatTemplate {
            source: source.to_string(),
            template,
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
            add_bos_token: cfg.get("add_bos_token").and_then(Value::as_bool).unwrap_or(true),
        };
        // Fail at load time, not at the first message.
        t.environment().template_from_str(&t.template).map_err(|e| anyhow!("{source}: chat_template: {e}"))?;
        Ok(Some(t))
    }

    fn environment(&self) -> minijinja::Environment<'static> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env
    }

    /// The conversation as the model was trained to see it; with `add_generation_prompt`, ending
    /// where the assistant's next reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment();
        let t = env.template_from_str(&self.template).map_err(|e| anyhow!("{}: chat_template: {e}", self.source))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| anyhow!("{}: chat_template: {e}", self.source))
        .context("rendering the conversation")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_template_is_none_and_bad_ones_say_where() {
        assert!(ChatTemplate::from_tokenizer_config(br#"{"bos_token": "<s>"}"#, "t.json").unwrap().is_none());
        let e = ChatTemplate::from_tokenizer_config(br#"{"chat_template": "{% for %}"}"#, "t.json").unwrap_err();
        assert!(e.to_string().starts_with("t.json: chat_template"), "{e}");
        let e = ChatTemplate::from_tokenizer_config(b"{", "t.json").unwrap_err();
        assert!(e.to_string().starts_with("t.json: not valid JSON"), "{e}");
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let cfg = serde_json::json!({
            "chat_template": "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{{ m['content'].strip() | upper }}{% endfor %}",
            "eos_token": {"content": "</s>", "lstrip": false},
        });
        let t = ChatTemplate::from_tokenizer_config(cfg.to_string().as_bytes(), "t.json").unwrap().unwrap();
        assert_eq!(t.eos_token, "</s>");
        assert_eq!(t.render(&[Message::new("user", "  hi  ")], true).unwrap(), "HI");
        let e = t.render(&[Message::new("tool", "x")], true).unwrap_err();
        assert!(format!("{e:#}").contains("no tools"), "{e:#}");
    }
}

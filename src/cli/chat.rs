//! `kiln chat --model DIR [--device cuda]`: a conversation on standard input, one message per line, replies
//! streamed to standard output through the model's chat template (plain continuation when its
//! tokenizer has none). `/clear` starts over.

use crate::backend::Backend;
use crate::chat::prompt::ChatFormat;
use crate::chat::reply::{stream_reply, ReplyParams};
use crate::chat::{ChatTemplate, Message};
use crate::io::load_model_dir;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

pub struct ChatArgs {
    pub system: Option<String>,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
}

/// Chats on `device` ("cpu" or "cuda").
pub fn run(model_dir: &Path, args: ChatArgs, device: &str) -> Result<()> {
    crate::on_device!(device, |b| run_on(model_dir, args, b))
}

fn run_on<B: Backend>(model_dir: &Path, args: ChatArgs, backend: B) -> Result<()> {
    let dir = crate::train::checkpoint::resolve_model_dir(model_dir)?;
    let md = load_model_dir(&dir, backend)?;
    let config = dir.join("tokenizer_config.json");
    let template = match std::fs::read(&config) {
        Ok(bytes) => ChatTemplate::from_tokenizer_config(&bytes, &config.display().to_string())?,
        Err(_) => None,
    };
    let format = ChatFormat::new(md.tokenizer()?.clone(), template, md.bos, &md.eos);
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        let how = if format.template.is_some() { "its chat template" } else { "plain continuation (no chat template)" };
        crate::note!("chatting with {} through {how}; /clear starts over, Ctrl-D ends", dir.display());
    }
    let mut messages: Vec<Message> = args.system.iter().map(|s| Message::new("system", s)).collect();
    let context = md.model.cfg.max_seq_len;
    if args.max_tokens >= context {
        bail!(
            "--max-tokens {} leaves no room for the conversation in the model's context of {context} tokens",
            args.max_tokens
        );
    }
    let max_tokens = args.max_tokens.max(1);
    let stdin = std::io::stdin();
    let mut turn = 0u64;
    loop {
        if interactive {
            // Not eprint!, which panics when stderr is gone.
            let _ = write!(std::io::stderr(), "you › ").and_then(|()| std::io::stderr().flush());
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("stdin")? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim() == "/clear" {
            messages.retain(|m| m.role == "system");
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        messages.push(Message::new("user", line));
        let prompt = format.prompt(&messages, md.model.cfg.max_seq_len - max_tokens)?;
        let params = ReplyParams {
            temperature: args.temperature,
            top_p: args.top_p,
            max_tokens,
            seed: args.seed.wrapping_add(turn),
        };
        turn += 1;
        let mut out = std::io::stdout();
        let reply =
            stream_reply(&md.model, &format.tokenizer, &prompt.ids, &format.stop, params, &|| false, &mut |s| {
                let _ = write!(out, "{s}");
                let _ = out.flush();
            })?;
        writeln!(out)?;
        crate::note!("[{} tokens · {:.1} tok/s · {}]", reply.ids.len(), reply.tokens_per_s(), reply.end.describe());
        messages.push(Message::new("assistant", &reply.text));
    }
}

//! Chat: templates rendered and tokenized as transformers does (tests/fixtures/make_chat_reference.py),
//! SmolLM2-Instruct's greedy reply token for token, the engine's chat worker (streaming, stop), and
//! `kiln chat`.

mod common;

use kiln::backend::cpu::Cpu;
use kiln::chat::prompt::ChatFormat;
use kiln::chat::reply::{stream_reply, ReplyParams};
use kiln::chat::service::{ChatRequest, ChatService, Sink};
use kiln::chat::{ChatTemplate, Message};
use kiln::io::load_model_dir;
use kiln::model::init::random_weights;
use kiln::model::{Llama, LlamaConfig};
use kiln::tokenizer::Tokenizer;
use kiln::train::events::Event;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

fn template(case: &Value) -> ChatTemplate {
    let cfg = serde_json::json!({
        "chat_template": case["template"],
        "bos_token": case["bos_token"],
        "eos_token": case["eos_token"],
        "add_bos_token": case["add_bos_token"],
    });
    ChatTemplate::from_tokenizer_config(cfg.to_string().as_bytes(), "case").unwrap().unwrap()
}

#[test]
fn templates_render_and_tokenize_as_transformers_does() {
    let r = reference();
    let mut checked = 0;
    for case in r["cases"].as_array().unwrap() {
        let tok = match case["tokenizer"].as_str().unwrap() {
            "llama2" => Tokenizer::llama2(),
            _ => match common::real_model_dir() {
                Some(d) => Tokenizer::from_file(&d.join("tokenizer.json")).unwrap(),
                None => continue,
            },
        };
        let name = case["name"].as_str().unwrap();
        let t = template(case);
        let text = t.render(&messages(&case["messages"]), true).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{name}: rendered text");
        let bos = tok.token_id(case["bos_token"].as_str().unwrap()).unwrap();
        let f = ChatFormat::new(tok, Some(t), bos, &[]);
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(f.encode(&text).unwrap(), ids, "{name}: token ids");
        let eos = f.tokenizer.token_id(case["eos_token"].as_str().unwrap()).unwrap();
        assert!(f.stop.contains(&eos), "{name}: the template's end-of-turn token ends replies");
        checked += 1;
    }
    assert!(checked >= 2);
}

#[test]
fn a_template_can_refuse_a_conversation() {
    let r = reference();
    let case = r["cases"].as_array().unwrap().iter().find(|c| c["name"] == "llama-2-chat").unwrap();
    let bad = [Message::new("user", "a"), Message::new("user", "b")];
    let e = template(case).render(&bad, true).unwrap_err();
    assert!(format!("{e:#}").contains("must alternate"), "{e:#}");
}

#[test]
fn smollm2_instruct_replies_as_transformers_does() {
    let Some(dir) = common::real_model_dir() else { return };
    let r = reference();
    let want: Vec<u32> = serde_json::from_value(r["smollm2_reply"]["ids"].clone()).unwrap();
    let md = load_model_dir(&dir, Cpu::new()).unwrap();
    let bytes = std::fs::read(dir.join("tokenizer_config.json")).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&bytes, "tokenizer_config.json").unwrap();
    let f = ChatFormat::new(md.tokenizer().unwrap().clone(), t, md.bos, &md.eos);
    let prompt = f.prompt(&messages(&r["smollm2_reply"]["messages"]), 1000).unwrap();
    let p = ReplyParams { temperature: 0.0, top_p: 1.0, max_tokens: 40, seed: 0 };
    let mut streamed = String::new();
    let reply =
        stream_reply(&md.model, &f.tokenizer, &prompt.ids, &f.stop, p, &|| false, &mut |s| streamed += s).unwrap();
    assert_eq!(reply.ids, want);
    assert_eq!(streamed, r["smollm2_reply"]["text"].as_str().unwrap());

    // The same through the binary, two turns on stdin.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chat", "--model", dir.to_str().unwrap(), "--temperature", "0", "--max-tokens", "40"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"What is the capital of France?\nAnd of Germany?\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Paris") && out.contains("Berlin"), "{out}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("tok/s"));
}

fn tiny() -> (LlamaConfig, Arc<kiln::model::Weights<Vec<f32>>>) {
    let cfg = LlamaConfig {
        n_layer: 2,
        d_model: 32,
        n_head: 4,
        n_kv_head: 2,
        d_ff: 64,
        vocab_size: 32000,
        max_seq_len: 96,
        ..LlamaConfig::preset("tiny").unwrap()
    };
    let w = random_weights(&cfg, 3).unwrap();
    (cfg, Arc::new(w))
}

/// Collects events from the worker; returns them once reply `id` is done.
fn collect(events: &Arc<Mutex<Vec<Event>>>, id: u64) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let ev = events.lock().unwrap();
            if ev.iter().any(|e| matches!(e, Event::ChatDone { id: i, .. } if *i == id)) {
                return ev.clone();
            }
        }
        assert!(Instant::now() < deadline, "no reply");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_engine_chat_worker_streams_replies_and_stops_on_request() {
    let (cfg, w) = tiny();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let seen = events.clone();
    let sink: Sink = Arc::new(move |e: &Event| seen.lock().unwrap().push(e.clone()));
    let format = ChatFormat::new(Tokenizer::llama2(), None, 1, &[2]);
    let chat = ChatService::start(format.clone(), sink).unwrap();
    let req = |id| ChatRequest {
        id,
        messages: vec![Message::new("user", "Once upon a time")],
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: 20,
    };
    chat.submit(req(1), 7, cfg.clone(), w.clone());
    let ev = collect(&events, 1);
    let text: String = ev
        .iter()
        .filter_map(|e| match e {
            Event::ChatToken { id: 1, text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let Some(Event::ChatDone { step, tokens, ended, .. }) = ev.last() else { panic!("{ev:?}") };
    assert_eq!((*step, ended.as_str()), (7, "token limit"));
    assert_eq!(*tokens, 20);
    // The streamed pieces add up to what a direct reply from the same weights says.
    let model = Llama::from_host(cfg.clone(), Cpu::new(), &w).unwrap();
    let prompt = format.prompt(&req(1).messages, 76).unwrap();
    let p = ReplyParams { temperature: 0.0, top_p: 1.0, max_tokens: 20, seed: 0 };
    let direct = stream_reply(&model, &format.tokenizer, &prompt.ids, &format.stop, p, &|| false, &mut |_| {}).unwrap();
    assert_eq!(text, direct.text);

    // A stop that arrives first ends the reply before its first token.
    chat.stop(2);
    chat.submit(req(2), 7, cfg.clone(), w.clone());
    let ev = collect(&events, 2);
    assert!(ev.iter().any(|e| matches!(e, Event::ChatDone { id: 2, tokens: 0, ended, .. } if ended == "stopped")));
    // A conversation too long for the context is an error reply, not a dead worker.
    let mut long = req(3);
    long.messages = vec![Message::new("user", &"word ".repeat(200))];
    chat.submit(long, 7, cfg.clone(), w.clone());
    let ev = collect(&events, 3);
    assert!(ev.iter().any(|e| matches!(e, Event::ChatDone { id: 3, ended, .. } if ended.contains("context"))));
    chat.submit(req(4), 8, cfg, w);
    collect(&events, 4);
}

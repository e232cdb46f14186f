//! The seven tasks, their files, and the prompts lm-evaluation-harness builds from them.
//! Multiple-choice files hold `{query, choices, gold}`; WinoGrande holds
//! `{context_options, continuation, gold}` and is scored by partial evaluation.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

pub const TASKS: [&str; 7] = ["hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa"];

/// The 500-item subsets shipped in assets/eval (compiled in, so `kiln eval` runs anywhere).
const BUNDLED: [(&str, &str); 7] = [
    ("hellaswag", include_str!("../../assets/eval/tinyllama_suite_500/hellaswag.jsonl")),
    ("openbookqa", include_str!("../../assets/eval/tinyllama_suite_500/openbookqa.jsonl")),
    ("winogrande", include_str!("../../assets/eval/tinyllama_suite_500/winogrande.jsonl")),
    ("arc_easy", include_str!("../../assets/eval/tinyllama_suite_500/arc_easy.jsonl")),
    ("arc_challenge", include_str!("../../assets/eval/tinyllama_suite_500/arc_challenge.jsonl")),
    ("boolq", include_str!("../../assets/eval/tinyllama_suite_500/boolq.jsonl")),
    ("piqa", include_str!("../../assets/eval/tinyllama_suite_500/piqa.jsonl")),
];

/// The metric the TinyLlama paper reports for each task.
pub fn paper_metric(task: &str) -> &'static str {
    match task {
        "hellaswag" | "openbookqa" | "arc_challenge" => "acc_norm",
        _ => "acc",
    }
}

/// One scored choice: log p(continuation | context), both as text.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

/// One item: a request per choice, the gold index, and each choice's length for `acc_norm`
/// (`None` for WinoGrande, which lm-evaluation-harness reports as `acc` only).
#[derive(Clone, Debug)]
pub struct Item {
    pub requests: Vec<Request>,
    pub gold: usize,
    pub choice_chars: Option<Vec<usize>>,
}

fn field<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a Value> {
    v.get(key).with_context(|| format!("{at}: missing field {key:?}"))
}

fn string(v: &Value, key: &str, at: &str) -> Result<String> {
    field(v, key, at)?.as_str().map(str::to_string).with_context(|| format!("{at}: field {key:?} must be a string"))
}

fn strings(v: &Value, key: &str, at: &str) -> Result<Vec<String>> {
    let a = field(v, key, at)?.as_array().with_context(|| format!("{at}: field {key:?} must be a list of strings"))?;
    let out: Option<Vec<String>> = a.iter().map(|x| x.as_str().map(str::to_string)).collect();
    let out = out.with_context(|| format!("{at}: field {key:?} must be a list of strings"))?;
    if out.len() < 2 {
        bail!("{at}: field {key:?} needs at least two entries");
    }
    Ok(out)
}

/// Builds one item of `task` from a parsed line (`at` = "file:line" for errors).
pub fn item(task: &str, v: &Value, at: &str) -> Result<Item> {
    let gold = field(v, "gold", at)?
        .as_u64()
        .with_context(|| format!("{at}: field \"gold\" must be a non-negative integer"))? as usize;
    let item = if task == "winogrande" {
        let options = strings(v, "context_options", at)?;
        let cont = format!(" {}", string(v, "continuation", at)?);
        let requests = options.into_iter().map(|c| Request { context: c, continuation: cont.clone() }).collect();
        Item { requests, gold, choice_chars: None }
    } else {
        let query = string(v, "query", at)?;
        let choices = strings(v, "choices", at)?;
        let context = match task {
            "arc_easy" | "arc_challenge" | "boolq" => format!("{query}\nAnswer:"),
            "piqa" => format!("{query}Answer:"), // the query already ends in a newline
            _ => query,
        };
        let chars = choices.iter().map(|c| c.chars().count()).collect();
        let requests =
            choices.iter().map(|c| Request { context: context.clone(), continuation: format!(" {c}") }).collect();
        Item { requests, gold, choice_chars: Some(chars) }
    };
    if item.gold >= item.requests.len() {
        bail!("{at}: gold {} is out of range for {} choices", item.gold, item.requests.len());
    }
    Ok(item)
}

/// Parses a task file's text (`source` names it in errors).
pub fn parse(task: &str, text: &str, source: &str) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{source}:{}", i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{at}: not valid JSON ({e})"))?;
        items.push(item(task, &v, &at)?);
    }
    if items.is_empty() {
        bail!("{source}: no items");
    }
    Ok(items)
}

/// Loads `task` from `data_dir/<task>.jsonl`, or the bundled subset when `data_dir` is `None`.
pub fn load(task: &str, data_dir: Option<&Path>) -> Result<Vec<Item>> {
    if !TASKS.contains(&task) {
        bail!("unknown task {task:?} (known: {})", TASKS.join(", "));
    }
    match data_dir {
        Some(dir) => {
            let p = dir.join(format!("{task}.jsonl"));
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read task file", p.display()))?;
            parse(task, &text, &p.display().to_string())
        }
        None => {
            let text = BUNDLED.iter().find(|(n, _)| *n == task).map(|(_, t)| *t).expect("every task is bundled");
            parse(task, text, &format!("assets/eval/tinyllama_suite_500/{task}.jsonl"))
        }
    }
}

/// Parses a comma-separated task list; "all" means the paper's seven.
pub fn task_list(spec: &str) -> Result<Vec<String>> {
    if spec.trim() == "all" {
        return Ok(TASKS.iter().map(|s| s.to_string()).collect());
    }
    let mut tasks: Vec<String> = Vec::new();
    for t in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // Each task once, in the order first named: a repeat would score it twice and count it
        // twice in the average.
        if !tasks.iter().any(|k| k == t) {
            tasks.push(t.to_string());
        }
    }
    for t in &tasks {
        if !TASKS.contains(&t.as_str()) {
            bail!("unknown task {t:?} (known: {})", TASKS.join(", "));
        }
    }
    if tasks.is_empty() {
        bail!("--tasks: no tasks given");
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_named_twice_is_scored_once() {
        assert_eq!(task_list("hellaswag, piqa,hellaswag,piqa").unwrap(), vec!["hellaswag", "piqa"]);
    }

    #[test]
    fn prompts_follow_lm_evaluation_harness() {
        let v: Value =
            serde_json::from_str(r#"{"query": "Question: Q?", "choices": ["yes", "no"], "gold": 1}"#).unwrap();
        let arc = item("arc_easy", &v, "t").unwrap();
        assert_eq!(arc.requests[0], Request { context: "Question: Q?\nAnswer:".into(), continuation: " yes".into() });
        assert_eq!(arc.choice_chars, Some(vec![3, 2]));
        let piqa: Value =
            serde_json::from_str(r#"{"query": "Question: Q\n", "choices": ["a", "b"], "gold": 0}"#).unwrap();
        assert_eq!(item("piqa", &piqa, "t").unwrap().requests[1].context, "Question: Q\nAnswer:");
        assert_eq!(item("hellaswag", &v, "t").unwrap().requests[0].context, "Question: Q?");
        let w: Value =
            serde_json::from_str(r#"{"context_options": ["A x", "B x"], "continuation": "ran.", "gold": 1}"#).unwrap();
        let wi = item("winogrande", &w, "t").unwrap();
        assert_eq!(wi.requests[1], Request { context: "B x".into(), continuation: " ran.".into() });
        assert!(wi.choice_chars.is_none());
    }

    #[test]
    fn malformed_items_name_file_and_line() {
        let e = parse("arc_easy", "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{oops", "f.jsonl")
            .unwrap_err();
        assert!(e.to_string().starts_with("f.jsonl:2: not valid JSON"), "{e}");
        let e = parse("arc_easy", r#"{"query": "q", "choices": ["a", "b"], "gold": 2}"#, "f.jsonl").unwrap_err();
        assert!(e.to_string().contains("f.jsonl:1: gold 2 is out of range"), "{e}");
        let e = parse("piqa", r#"{"choices": ["a", "b"], "gold": 0}"#, "f.jsonl").unwrap_err();
        assert!(e.to_string().contains("f.jsonl:1: missing field \"query\""), "{e}");
        let e = parse("winogrande", r#"{"context_options": ["a", "b"], "gold": 0}"#, "w.jsonl").unwrap_err();
        assert!(e.to_string().contains("\"continuation\""), "{e}");
    }

    #[test]
    fn bundled_tasks_load() {
        for t in TASKS {
            assert_eq!(load(t, None).unwrap().len(), 500, "{t}");
        }
    }
}

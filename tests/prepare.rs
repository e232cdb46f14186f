//! `kiln prepare`: every input format round-trips (decoded shards equal the documents), the
//! held-out split is by document, re-runs are no-ops, and half-written output is never trusted.

use kiln::data::dataset::Dataset;
use kiln::data::prepare::{prepare, PrepareArgs, DEFAULT_SHARD_TOKENS};
use kiln::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tok_path() -> PathBuf {
    root().join("assets/tokenizer/llama2/tokenizer.json")
}

fn args(out: &Path, inputs: Vec<PathBuf>, val: f64, shard_tokens: usize) -> PrepareArgs {
    PrepareArgs {
        tokenizer: tok_path(),
        out: out.into(),
        inputs,
        text_field: None,
        val_fraction: val,
        shard_tokens,
        progress: false,
    }
}

/// Splits a packed stream back into documents at BOS … EOS and decodes them.
fn decode_docs(ds: &Dataset, tok: &Tokenizer) -> Vec<String> {
    let mut all = Vec::new();
    ds.train.read_into(0, ds.train.len as usize, &mut all);
    let mut docs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for t in all {
        match t {
            1 => cur.clear(),
            2 => docs.push(tok.decode(&cur).unwrap()),
            t => cur.push(t),
        }
    }
    docs
}

/// tests/fixtures/data (from tests/fixtures/make_data_fixtures.py): small inputs in every format
/// and expected.json, the documents as the script wrote them, not as kiln's readers read them.
fn data_fixtures() -> (PathBuf, serde_json::Value) {
    let dir = root().join("tests/fixtures/data");
    let expected = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    (dir, serde_json::from_str(&expected).unwrap())
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn every_format_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let (dir, expected) = data_fixtures();
    // Named in a fixed order that is not sorted order: inputs are read in the order given.
    let inputs: Vec<PathBuf> = strings(&expected["files"]).iter().map(|f| dir.join(f)).collect();
    let originals = strings(&expected["documents"]);
    let per_file: Vec<u64> = serde_json::from_value(expected["documents_per_file"].clone()).unwrap();
    let out = t.path().join("out");
    // Small shards so the stream crosses shard boundaries (about 2,400 tokens in all).
    let s = prepare(&args(&out, inputs, 0.0, 64)).unwrap();
    assert!(s.index.train.shards.len() > 3);
    assert_eq!(s.index.train.documents as usize, originals.len());
    assert_eq!(s.index.inputs.iter().map(|i| i.documents).collect::<Vec<_>>(), per_file);
    let tok = Tokenizer::from_file(&tok_path()).unwrap();
    let ds = Dataset::open(&out, None, 32000).unwrap();
    let decoded = decode_docs(&ds, &tok);
    assert_eq!(decoded.len(), originals.len());
    for (i, (d, o)) in decoded.iter().zip(&originals).enumerate() {
        assert_eq!(d, o, "document {i}");
    }
}

#[test]
fn jsonl_zst_and_parquet_honour_the_text_field() {
    let t = tempfile::tempdir().unwrap();
    let (dir, expected) = data_fixtures();
    let over = &expected["text_field"];
    let inputs: Vec<PathBuf> = strings(&over["files"]).iter().map(|f| dir.join(f)).collect();
    let originals = strings(&over["documents"]);
    let out = t.path().join("out");
    let mut a = args(&out, inputs, 0.0, DEFAULT_SHARD_TOKENS);
    // Each file also holds the default field ("text", "content"), with other text.
    a.text_field = Some(over["field"].as_str().unwrap().to_string());
    prepare(&a).unwrap();
    let tok = Tokenizer::from_file(&tok_path()).unwrap();
    let decoded = decode_docs(&Dataset::open(&out, None, 32000).unwrap(), &tok);
    assert_eq!(decoded, originals);
}

#[test]
fn validation_split_is_by_document_and_reruns_are_no_ops() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let input = vec![root().join("assets/corpus/slimpajama_like/validation")];
    let a = prepare(&args(&out, input.clone(), 0.1, DEFAULT_SHARD_TOKENS)).unwrap();
    let (tr, va) = (a.index.train.documents, a.index.val.documents);
    let frac = va as f64 / (tr + va) as f64;
    assert!((0.07..0.13).contains(&frac), "held out {frac}");
    let shard = out.join("train-00000.bin");
    let mtime = std::fs::metadata(&shard).unwrap().modified().unwrap();
    let b = prepare(&args(&out, input.clone(), 0.1, DEFAULT_SHARD_TOKENS)).unwrap();
    assert!(b.skipped);
    assert_eq!(a.index, b.index);
    assert_eq!(std::fs::metadata(&shard).unwrap().modified().unwrap(), mtime);
    // A different split fraction is a different dataset: it is rebuilt.
    let c = prepare(&args(&out, input, 0.0, DEFAULT_SHARD_TOKENS)).unwrap();
    assert!(!c.skipped);
    assert_eq!(c.index.val.documents, 0);
    assert!(!out.join("val-00000.bin").exists());
}

#[test]
fn interrupted_output_is_never_trusted() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let input = vec![root().join("assets/corpus/starcoder_like/c")];
    prepare(&args(&out, input.clone(), 0.0, DEFAULT_SHARD_TOKENS)).unwrap();
    // Simulate a run killed mid-way: index gone, a half-written shard left behind.
    std::fs::remove_file(out.join("index.json")).unwrap();
    std::fs::write(out.join("train-00001.bin.tmp"), b"partial").unwrap();
    assert!(Dataset::open(&out, None, 32000).is_err(), "no index, no dataset");
    let s = prepare(&args(&out, input, 0.0, DEFAULT_SHARD_TOKENS)).unwrap();
    assert!(!s.skipped);
    assert!(!out.join("train-00001.bin.tmp").exists());
    Dataset::open(&out, None, 32000).unwrap();
    // A truncated shard is caught when opening.
    let shard = out.join("train-00000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let e = Dataset::open(&out, None, 32000).err().unwrap().to_string();
    assert!(e.contains("corrupt shard"), "{e}");
}

#[test]
fn bad_inputs_name_the_file() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let e = prepare(&args(&out, vec![t.path().join("missing.jsonl")], 0.0, 1000)).unwrap_err().to_string();
    assert!(e.contains("missing.jsonl") && e.contains("does not exist"), "{e}");
    let nofield = t.path().join("nofield.jsonl");
    std::fs::write(&nofield, "{\"body\": \"x\"}\n").unwrap();
    let e = prepare(&args(&out, vec![nofield], 0.0, 1000)).unwrap_err().to_string();
    assert!(e.contains("nofield.jsonl:1") && e.contains("\"text\""), "{e}");
    let empty = t.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = prepare(&args(&out, vec![empty], 0.0, 1000)).unwrap_err().to_string();
    assert!(e.contains("no documents"), "{e}");
    let zst = t.path().join("bad.jsonl.zst");
    std::fs::write(&zst, b"not zstd at all").unwrap();
    let e = format!("{:#}", prepare(&args(&out, vec![zst], 0.0, 1000)).unwrap_err());
    assert!(e.contains("bad.jsonl.zst"), "{e}");
    let pq = t.path().join("bad.parquet");
    std::fs::write(&pq, b"PAR1 garbage").unwrap();
    let e = prepare(&args(&out, vec![pq], 0.0, 1000)).unwrap_err().to_string();
    assert!(e.contains("bad.parquet") && e.contains("not a parquet file"), "{e}");
}

#[test]
fn a_failed_re_prepare_leaves_the_earlier_dataset_as_it_was() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let good = vec![root().join("assets/corpus/starcoder_like/c")];
    prepare(&args(&out, good.clone(), 0.0, DEFAULT_SHARD_TOKENS)).unwrap();
    let before: Vec<(String, Vec<u8>)> = {
        let mut v: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let bad = t.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{not json\n").unwrap();
    let mut inputs = good;
    inputs.push(bad);
    let e = prepare(&args(&out, inputs, 0.0, DEFAULT_SHARD_TOKENS)).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:2"), "{e}");
    let mut after: Vec<(String, Vec<u8>)> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    after.sort();
    assert!(before == after, "the output directory changed (no staging left, same files, same bytes)");
    Dataset::open(&out, None, 32000).unwrap();
    // A user's own index.json is not kiln's to delete.
    let mine = t.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("index.json"), "{\"my\": \"notes\"}").unwrap();
    let e =
        prepare(&args(&mine, vec![root().join("assets/corpus/starcoder_like/c")], 0.0, 1000)).unwrap_err().to_string();
    assert!(e.contains("index.json: exists and is not a kiln dataset index"), "{e}");
    // Nor is a file that is named like a shard but is not one.
    let theirs = t.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("train-00003.bin"), "mine").unwrap();
    let e = prepare(&args(&theirs, vec![root().join("assets/corpus/starcoder_like/c")], 0.0, 1000))
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("train-00003.bin: exists and is not a kiln token shard; prepare into another --out"), "{e}");
    assert_eq!(std::fs::read_to_string(theirs.join("train-00003.bin")).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(mine.join("index.json")).unwrap(), "{\"my\": \"notes\"}");
}

#[test]
fn a_parquet_file_the_decoder_panics_on_is_a_one_line_error() {
    let t = tempfile::tempdir().unwrap();
    // One flipped byte in the footer's metadata gives a negative column-chunk offset, on which the
    // parquet crate panics rather than returning an error.
    let mut bytes =
        std::fs::read(root().join("assets/corpus/starcoder_like/python/train-00000-of-00001.parquet")).unwrap();
    bytes[736_875] = 0xa3;
    let pq = t.path().join("corrupt.parquet");
    std::fs::write(&pq, bytes).unwrap();
    let e = prepare(&args(&t.path().join("out"), vec![pq], 0.0, 1000)).unwrap_err().to_string();
    assert!(e.contains("corrupt.parquet: corrupt parquet file ("), "{e}");
}

#[test]
fn a_token_outside_the_vocabulary_names_its_shard() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let tok = kiln::tokenizer::LLAMA2_TOKENIZER_JSON;
    kiln::data::prepare::write_token_dataset(&dir, &[1, 5, 40000, 2], &[], tok).unwrap();
    let e = Dataset::open(&dir, None, 32000).err().unwrap().to_string();
    assert!(e.ends_with("train-00000.bin: token id 40000 is outside the model's vocabulary of 32000"), "{e}");
}

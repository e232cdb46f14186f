//! Text ↔ token ids through the `tokenizers` crate. The Llama-2 tokenizer is compiled into the
//! binary (assets/tokenizer/llama2, with its NOTICE), so kiln works without any model-side tokenizer
//! and without the source tree at run time.

use anyhow::{bail, Context, Result};
use std::path::Path;

pub const LLAMA2_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/tokenizer/llama2/tokenizer.json");

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for error messages.
    pub source: String,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// The bundled Llama-2 tokenizer (32,000 pieces; `<s>` = 1, `</s>` = 2).
    pub fn llama2() -> Self {
        Self::from_bytes(LLAMA2_TOKENIZER_JSON, "bundled Llama-2 tokenizer").expect("the bundled tokenizer parses")
    }

    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| anyhow::anyhow!("{source}: not a valid tokenizer.json ({})", one_line(&e.to_string())))?;
        Ok(Tokenizer { inner, source: source.to_string() })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }

    /// Encodes `text` without the tokenizer's own special-token template; `bos` is prepended when
    /// given, so the result does not depend on how a tokenizer.json sets up its post-processor.
    pub fn encode(&self, text: &str, bos: Option<u32>) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("{}: cannot encode text ({})", self.source, one_line(&e.to_string())))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(bos);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, leaving out special tokens (BOS, EOS).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("{}: cannot decode ids ({})", self.source, one_line(&e.to_string())))
    }

    /// Checks that every id the tokenizer can produce is a row of the model's embedding.
    pub fn check_vocab(&self, model_vocab: usize, model_source: &str) -> Result<()> {
        let n = self.vocab_size();
        if n > model_vocab {
            bail!(
                "{}: tokenizer has {n} tokens but {model_source} has vocab_size {model_vocab} (vocab mismatch)",
                self.source
            );
        }
        Ok(())
    }

    /// For training: the model's vocabulary must be this tokenizer's, give or take padding to a
    /// multiple of 1024 (32000 may become 32064 or 32768, never 512 tokens in a 32000-row table:
    /// that is the wrong tokenizer, and data prepared with it would replace the right one's).
    pub fn check_vocab_for_training(&self, model_vocab: usize, model_source: &str) -> Result<()> {
        self.check_vocab(model_vocab, model_source)?;
        let n = self.vocab_size();
        let padded = n.div_ceil(1024) * 1024;
        if model_vocab > padded {
            bail!(
                "{}: tokenizer has {n} tokens but {model_source} has vocab_size {model_vocab} (vocab mismatch: \
                 the wrong tokenizer for this model?)",
                self.source
            );
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

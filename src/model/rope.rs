//! Rotary-embedding tables, computed the way Hugging Face's `LlamaRotaryEmbedding` does (f32
//! inverse frequencies `1 / theta^(2i/d)`, f32 angles `pos · inv_freq`) so log-probabilities agree
//! with transformers to the last bits that matter.

/// `(cos, sin)`, each `[max_pos, head_dim / 2]`.
pub fn tables(head_dim: usize, max_pos: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for &f in &inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

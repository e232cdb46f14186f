use rayon::prelude::*;

pub fn forward(out: &mut [f32], table: &[f32], ids: &[u32], d: usize) {
    out[..ids.len() * d].par_chunks_mut(d).zip(ids.par_iter()).for_each(|(row, &id)| {
        let id = id as usize;
        row.copy_from_slice(&table[id * d..(id + 1) * d]);
    });
}

/// Sequential on purpose: rows that share a token id add into the same table row, and a fixed
/// order keeps the result deterministic. It is O(rows · d), negligible next to the GEMMs.
pub fn backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], d: usize) {
    for (r, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let dst = &mut dtable[id * d..(id + 1) * d];
        for (t, &g) in dst.iter_mut().zip(&dout[r * d..(r + 1) * d]) {
            *t += g;
        }
    }
}

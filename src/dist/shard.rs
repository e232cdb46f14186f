//! How FSDP splits a flattened unit of parameters across ranks: padded to a multiple of the world
//! size, rank `r` owning `[r·shard, (r+1)·shard)`. Resharding to another world size goes through the
//! consolidated (unpadded) vector, which is what checkpoints store.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    /// Values in the unit.
    pub len: usize,
    pub world_size: usize,
    /// Values per rank (the last rank's tail is padding).
    pub shard: usize,
}

impl ShardLayout {
    pub fn new(len: usize, world_size: usize) -> Self {
        ShardLayout { len, world_size, shard: len.div_ceil(world_size) }
    }
    pub fn padded(&self) -> usize {
        self.shard * self.world_size
    }
    /// The part of the unpadded vector rank `r` owns (may be empty for trailing ranks).
    pub fn owned(&self, r: usize) -> std::ops::Range<usize> {
        let lo = (r * self.shard).min(self.len);
        lo..((r + 1) * self.shard).min(self.len)
    }
    /// Rank `r`'s shard of `full` (unpadded), zero-padded to `shard` values.
    pub fn take(&self, full: &[f32], r: usize) -> Vec<f32> {
        let mut s = full[self.owned(r)].to_vec();
        s.resize(self.shard, 0.0);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uneven_units_pad_and_reshard_losslessly() {
        let full: Vec<f32> = (0..10).map(|i| i as f32).collect();
        for n in 1..=4 {
            let l = ShardLayout::new(full.len(), n);
            let shards: Vec<Vec<f32>> = (0..n).map(|r| l.take(&full, r)).collect();
            assert!(shards.iter().all(|s| s.len() == l.shard));
            let joined: Vec<f32> = shards.concat();
            assert_eq!(&joined[..full.len()], &full[..]);
            assert!(joined[full.len()..].iter().all(|&x| x == 0.0));
            // n → m resharding through the consolidated vector: world n's shards, joined and
            // stripped of their padding, give world m's shards exactly.
            let consolidated: Vec<f32> = joined[..full.len()].to_vec();
            for m in 1..=5 {
                let lm = ShardLayout::new(full.len(), m);
                for r in 0..m {
                    assert_eq!(lm.take(&consolidated, r), lm.take(&full, r), "{n} -> {m}, rank {r}");
                }
                let back: Vec<f32> = (0..m).flat_map(|r| lm.take(&consolidated, r)).take(full.len()).collect();
                assert_eq!(back, full, "{n} -> {m}");
            }
        }
    }
}

//! Training data: corpus readers, `kiln prepare` (documents → packed token shards), prepared
//! datasets, and the weighted mixture loader with its prefetch thread.

pub mod dataset;
pub mod loader;
pub mod mixture;
pub mod prepare;
pub mod readers;
pub mod shard;

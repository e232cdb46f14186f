//! Where this process sits in a multi-node run, read the way torchrun and SLURM say it:
//! `MASTER_ADDR`, `MASTER_PORT`, `NNODES`, `NODE_RANK`, falling back to `SLURM_NNODES`,
//! `SLURM_NODEID` and the first host of `SLURM_JOB_NODELIST`. One process runs per node and drives
//! that node's GPUs (a worker thread each); ranks are numbered node by node.

use anyhow::{bail, Context, Result};

/// The port node 0 listens on for the rendezvous when `MASTER_PORT` is not given (torchrun's).
pub const DEFAULT_PORT: u16 = 29500;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub nnodes: usize,
    pub node_rank: usize,
    /// Host of node 0, where the NCCL unique id is handed out.
    pub master_addr: String,
    pub master_port: u16,
}

impl Node {
    /// A run on this machine alone.
    pub fn single() -> Node {
        Node { nnodes: 1, node_rank: 0, master_addr: "127.0.0.1".into(), master_port: DEFAULT_PORT }
    }

    /// Reads the launch variables through `var` (the environment, or a map in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Node> {
        let get = |names: &[&'static str]| -> Option<(&'static str, String)> {
            names.iter().find_map(|&n| var(n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
        };
        let number = |names: &[&'static str]| -> Result<Option<usize>> {
            match get(names) {
                None => Ok(None),
                Some((n, v)) => {
                    v.trim().parse::<usize>().map(Some).map_err(|_| anyhow::anyhow!("{n}={v:?} is not a whole number"))
                }
            }
        };
        let nnodes = number(&["NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"])?.unwrap_or(1);
        if nnodes == 0 {
            bail!("NNODES=0: a run needs at least one node");
        }
        let node_rank = number(&["NODE_RANK", "SLURM_NODEID"])?.unwrap_or(0);
        if node_rank >= nnodes {
            bail!("NODE_RANK={node_rank} is not below NNODES={nnodes}");
        }
        let master_addr = match get(&["MASTER_ADDR"]) {
            Some((_, a)) => a.trim().to_string(),
            None => match get(&["SLURM_JOB_NODELIST", "SLURM_NODELIST"]) {
                Some((n, list)) => first_host(&list).with_context(|| format!("{n}={list:?}: cannot read a host"))?,
                None if nnodes > 1 => {
                    bail!("NNODES={nnodes} but neither MASTER_ADDR nor SLURM_JOB_NODELIST names node 0's host")
                }
                None => "127.0.0.1".into(),
            },
        };
        let master_port = match get(&["MASTER_PORT"]) {
            None => DEFAULT_PORT,
            Some((_, p)) => p.trim().parse().map_err(|_| anyhow::anyhow!("MASTER_PORT={p:?} is not a port number"))?,
        };
        Ok(Node { nnodes, node_rank, master_addr, master_port })
    }

    pub fn from_env() -> Result<Node> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// This node's ranks in a world of `world_size`, which must split evenly over the nodes.
    pub fn local_ranks(&self, world_size: usize) -> Result<std::ops::Range<usize>> {
        if world_size == 0 || !world_size.is_multiple_of(self.nnodes) {
            bail!(
                "parallel.world_size ({world_size}) must be a multiple of the number of nodes ({}): every node runs the same number of ranks",
                self.nnodes
            );
        }
        let per = world_size / self.nnodes;
        Ok(self.node_rank * per..(self.node_rank + 1) * per)
    }
}

/// The first host of a SLURM host list: `gpu[03-05,09],login1` → `gpu03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let Some(open) = entry.find('[') else {
        return (!entry.is_empty()).then(|| entry.to_string());
    };
    let close = entry[open..].find(']')? + open;
    let prefix = &entry[..open];
    let first = entry[open + 1..close].split(',').next()?;
    // A range keeps its zero padding: `[03-05]` starts at `03`.
    let lo = first.split('-').next()?.trim();
    if lo.is_empty() || !lo.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(format!("{prefix}{lo}{}", &entry[close + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn node(vars: &[(&str, &str)]) -> Result<Node> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Node::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let n =
            node(&[("MASTER_ADDR", "10.0.0.7"), ("MASTER_PORT", "1234"), ("NNODES", "2"), ("NODE_RANK", "1")]).unwrap();
        assert_eq!(n, Node { nnodes: 2, node_rank: 1, master_addr: "10.0.0.7".into(), master_port: 1234 });
        assert_eq!(n.local_ranks(16).unwrap(), 8..16);
    }

    #[test]
    fn slurm_fallbacks() {
        let n = node(&[("SLURM_NNODES", "2"), ("SLURM_NODEID", "0"), ("SLURM_JOB_NODELIST", "gpu[07-08]")]).unwrap();
        assert_eq!(n, Node { nnodes: 2, node_rank: 0, master_addr: "gpu07".into(), master_port: DEFAULT_PORT });
        // torchrun's variables win over SLURM's
        let n = node(&[("NNODES", "1"), ("SLURM_NNODES", "4"), ("SLURM_JOB_NODELIST", "a,b")]).unwrap();
        assert_eq!((n.nnodes, n.master_addr.as_str()), (1, "a"));
    }

    #[test]
    fn defaults_to_one_node() {
        assert_eq!(node(&[]).unwrap(), Node::single());
    }

    #[test]
    fn bad_launches_are_clear_errors() {
        let e = |v: &[(&str, &str)]| node(v).unwrap_err().to_string();
        assert!(e(&[("NNODES", "two")]).contains("NNODES=\"two\""));
        assert!(e(&[("NNODES", "2"), ("NODE_RANK", "2"), ("MASTER_ADDR", "h")]).contains("not below"));
        assert!(e(&[("NNODES", "2"), ("NODE_RANK", "1")]).contains("MASTER_ADDR"));
        assert!(e(&[("MASTER_PORT", "99999")]).contains("MASTER_PORT"));
        assert!(Node { nnodes: 3, ..Node::single() }.local_ranks(8).is_err());
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(first_host("gpu[03-05,09],login1").as_deref(), Some("gpu03"));
        assert_eq!(first_host("node1,node2").as_deref(), Some("node1"));
        assert_eq!(first_host("n[9]").as_deref(), Some("n9"));
        assert_eq!(first_host("rack[1-2]-gpu").as_deref(), Some("rack1-gpu"));
        assert_eq!(first_host("solo").as_deref(), Some("solo"));
        assert_eq!(first_host("bad[x-y]"), None);
        assert_eq!(first_host(""), None);
    }
}

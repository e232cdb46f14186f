//! The start of a multi-node run: node 0 hands its NCCL unique id to the other nodes over TCP
//! (`MASTER_ADDR:MASTER_PORT`), the way torchrun's store does. Every node also sends a fingerprint
//! of its launch (node count, world size, config), so a node started with another config is refused
//! with a clear error instead of deadlocking inside NCCL. The port is open only until every node has
//! joined.

use super::launch::Node;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"kiln-rv1";

/// What each node sends: who it is and what it was launched with.
struct Hello {
    node_rank: u32,
    nnodes: u32,
    fingerprint: u64,
}

impl Hello {
    fn bytes(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(self.node_rank.to_le_bytes());
        b.extend(self.nnodes.to_le_bytes());
        b.extend(self.fingerprint.to_le_bytes());
        b
    }

    fn read(s: &mut TcpStream) -> Result<Hello> {
        let mut b = [0u8; 24];
        s.read_exact(&mut b)?;
        if &b[..8] != MAGIC {
            bail!("a connection that is not a kiln node (another program on MASTER_PORT?)");
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Ok(Hello { node_rank: u32_at(8), nnodes: u32_at(12), fingerprint: u64::from_le_bytes(b[16..24].try_into()?) })
    }
}

fn send_reply(s: &mut TcpStream, reply: std::result::Result<&[u8], &str>) -> std::io::Result<()> {
    let (status, body) = match reply {
        Ok(p) => (0u8, p),
        Err(msg) => (1u8, msg.as_bytes()),
    };
    s.write_all(&[status])?;
    s.write_all(&(body.len() as u32).to_le_bytes())?;
    s.write_all(body)
}

/// Every node gets node 0's `payload` (made only there). `fingerprint` must agree across nodes.
/// Gives up after `timeout` with an error naming what was missing.
pub fn exchange(
    node: &Node,
    fingerprint: u64,
    payload: impl FnOnce() -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    if node.nnodes == 1 {
        return payload();
    }
    if node.node_rank == 0 {
        serve(node, fingerprint, payload()?, timeout)
    } else {
        join(node, fingerprint, timeout)
    }
}

fn serve(node: &Node, fingerprint: u64, payload: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
    let addr = format!("0.0.0.0:{}", node.master_port);
    let listener = TcpListener::bind(&addr).with_context(|| format!("rendezvous: cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut joined = vec![false; node.nnodes];
    joined[0] = true;
    let mut waiting: Vec<(usize, TcpStream)> = Vec::new();
    while joined.iter().any(|j| !j) {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let hello = match Hello::read(&mut s) {
                    Ok(h) => h,
                    Err(e) => {
                        crate::note!("rendezvous: ignoring {peer}: {e:#}");
                        continue;
                    }
                };
                let r = hello.node_rank as usize;
                let problem = if hello.nnodes as usize != node.nnodes {
                    Some(format!("node {r} was launched with NNODES={}, node 0 with {}", hello.nnodes, node.nnodes))
                } else if hello.fingerprint != fingerprint {
                    Some(format!("node {r} was launched with another config or world size than node 0"))
                } else if r == 0 || r >= node.nnodes || joined[r] {
                    Some(format!("two nodes claim NODE_RANK={r}"))
                } else {
                    None
                };
                if let Some(p) = problem {
                    let _ = send_reply(&mut s, Err(&p));
                    for (_, mut w) in waiting {
                        let _ = send_reply(&mut w, Err(&p));
                    }
                    bail!("rendezvous: {p}");
                }
                joined[r] = true;
                waiting.push((r, s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> =
                        joined.iter().enumerate().filter(|(_, j)| !**j).map(|(r, _)| r.to_string()).collect();
                    let msg = format!("nodes {} did not join within {} s", missing.join(", "), timeout.as_secs());
                    for (_, mut w) in waiting {
                        let _ = send_reply(&mut w, Err(&msg));
                    }
                    bail!("rendezvous on port {}: {msg}", node.master_port);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).context("rendezvous: accept failed"),
        }
    }
    // Everyone is here: hand out the id.
    for (r, mut s) in waiting {
        send_reply(&mut s, Ok(&payload)).with_context(|| format!("rendezvous: cannot reach node {r}"))?;
    }
    Ok(payload)
}

fn join(node: &Node, fingerprint: u64, timeout: Duration) -> Result<Vec<u8>> {
    let target = format!("{}:{}", node.master_addr, node.master_port);
    let deadline = Instant::now() + timeout;
    // Node 0 may start later than this one: keep trying until the deadline.
    let mut said = false;
    let mut s = loop {
        let addrs: Vec<_> = target.to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
        if let Some(s) = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok()) {
            break s;
        }
        if !said {
            // Once, so a node that waits says so (and a launch that never starts node 0 is visible).
            crate::note!("rendezvous: node 0 at {target} is not up yet; waiting up to {} s", timeout.as_secs());
            said = true;
        }
        if Instant::now() > deadline {
            bail!("rendezvous: node 0 at {target} did not answer within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let hello = Hello { node_rank: node.node_rank as u32, nnodes: node.nnodes as u32, fingerprint };
    s.write_all(&hello.bytes()).with_context(|| format!("rendezvous: cannot write to {target}"))?;
    // Node 0 answers once every node has joined.
    s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5)))?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).with_context(|| format!("rendezvous: no answer from node 0 at {target}"))?;
    let len = u32::from_le_bytes(head[1..5].try_into()?) as usize;
    if len > 1 << 20 {
        bail!("rendezvous: {target} sent a {len}-byte answer; is it a kiln node?");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).with_context(|| format!("rendezvous: answer from {target} cut short"))?;
    if head[0] != 0 {
        bail!("rendezvous: node 0 refused: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn node(rank: usize, nnodes: usize, port: u16) -> Node {
        Node { nnodes, node_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
    }

    #[test]
    fn every_node_gets_node_zeros_payload() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let joins: Vec<_> =
            (1..3).map(|r| std::thread::spawn(move || exchange(&node(r, 3, port), 7, || unreachable!(), t))).collect();
        let id = exchange(&node(0, 3, port), 7, || Ok(vec![42; 128]), t).unwrap();
        assert_eq!(id, vec![42; 128]);
        for j in joins {
            assert_eq!(j.join().unwrap().unwrap(), vec![42; 128]);
        }
    }

    #[test]
    fn a_node_with_another_config_is_refused_on_both_sides() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let other = std::thread::spawn(move || exchange(&node(1, 2, port), 8, || unreachable!(), t));
        let e = exchange(&node(0, 2, port), 7, || Ok(vec![1]), t).unwrap_err().to_string();
        assert!(e.contains("another config"), "{e}");
        let e = other.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("refused") && e.contains("another config"), "{e}");
    }

    #[test]
    fn a_missing_node_is_a_timeout_not_a_hang() {
        let port = free_port();
        let e = exchange(&node(0, 2, port), 7, || Ok(vec![1]), Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("nodes 1 did not join"), "{e}");
        let e = exchange(&node(1, 2, free_port()), 7, || unreachable!(), Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("did not answer"), "{e}");
    }
}

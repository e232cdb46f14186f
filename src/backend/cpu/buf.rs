//! The CPU backend's buffer: f32 values in host memory, counted against the meter of the `Cpu`
//! that made them, as a CUDA buffer is against its device's. Memory figures (FSDP's per-rank
//! persistent and peak bytes, a run's metrics) are then measured the same way on every backend,
//! with nothing kept by hand beside the allocations.

use crate::backend::MemStats;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// Owns its values and counts their bytes while it lives. It derefs to a slice, never to the
/// `Vec`: the length is fixed at creation, so the bytes counted in stay the bytes counted out.
pub struct CpuBuf {
    data: Vec<f32>,
    /// `None` for a buffer made without a backend (tests, host-side staging): counted nowhere.
    meter: Option<Arc<MemStats>>,
}

impl CpuBuf {
    /// `data`, counted against `meter` until dropped.
    pub(crate) fn metered(data: Vec<f32>, meter: &Arc<MemStats>) -> CpuBuf {
        meter.add(bytes(&data));
        CpuBuf { data, meter: Some(meter.clone()) }
    }

    /// `data`, counted against no backend (the plain `Vec`s of a test, fed to `Cpu` ops).
    pub fn unmetered(data: Vec<f32>) -> CpuBuf {
        CpuBuf { data, meter: None }
    }

    /// The values, handed back as a `Vec` (and no longer counted).
    pub fn into_vec(mut self) -> Vec<f32> {
        let data = std::mem::take(&mut self.data);
        if let Some(m) = self.meter.take() {
            m.sub(bytes(&data));
        }
        data
    }
}

fn bytes(data: &[f32]) -> usize {
    std::mem::size_of_val(data)
}

impl Drop for CpuBuf {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.sub(bytes(&self.data));
        }
    }
}

/// A copy is new memory, counted against the same meter as the original.
impl Clone for CpuBuf {
    fn clone(&self) -> CpuBuf {
        match &self.meter {
            Some(m) => CpuBuf::metered(self.data.clone(), m),
            None => CpuBuf::unmetered(self.data.clone()),
        }
    }
}

impl From<Vec<f32>> for CpuBuf {
    fn from(data: Vec<f32>) -> CpuBuf {
        CpuBuf::unmetered(data)
    }
}

impl Deref for CpuBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

impl DerefMut for CpuBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

/// Iterates the values, as `&Vec<f32>` does (`a.iter().zip(&b)`).
impl<'a> IntoIterator for &'a CpuBuf {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.data.iter()
    }
}

/// The values alone, as a `Vec`'s: which meter counts them is not part of what a buffer holds.
impl fmt::Debug for CpuBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.data.fmt(f)
    }
}

/// Equal values are equal buffers, whichever meter counts them.
impl PartialEq for CpuBuf {
    fn eq(&self, other: &CpuBuf) -> bool {
        self.data == other.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_counts_its_bytes_while_it_lives_and_its_clones_count_too() {
        let m = Arc::new(MemStats::default());
        let a = CpuBuf::metered(vec![1.0; 10], &m);
        assert_eq!((m.live(), m.peak()), (40, 40));
        let b = a.clone();
        assert_eq!((m.live(), m.peak()), (80, 80));
        assert_eq!(a, b);
        drop(a);
        assert_eq!((m.live(), m.peak()), (40, 80));
        assert_eq!(b.into_vec(), vec![1.0; 10]);
        assert_eq!((m.live(), m.peak()), (0, 80));
        let u = CpuBuf::from(vec![0.0; 5]);
        drop(u.clone());
        assert_eq!((m.live(), m.peak()), (0, 80));
    }
}

//! Content-defined chunking with FastCDC (2020), keyed by a seed derived from the master key.
//!
//! The crate's `StreamCDC` moves its whole buffer on every chunk; this reader keeps a buffer of
//! twice the maximum chunk size and compacts it only when less than one maximum chunk remains,
//! so each byte is copied at most once more.

use fastcdc::v2020::{cut_gear, get_gear_with_seed, MASKS};
use std::io::{self, Read};

/// Chunk size parameters, frozen per repository in its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChunkerParams {
    /// No chunk is smaller, but the last of a file.
    pub min_size: u32,
    /// The target average.
    pub avg_size: u32,
    /// No chunk is larger.
    pub max_size: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        // restic's sizes: comparable dedup and repository size, few blobs per GB.
        ChunkerParams { min_size: 512 * 1024, avg_size: 1024 * 1024, max_size: 8 * 1024 * 1024 }
    }
}

impl ChunkerParams {
    /// True when the sizes are within FastCDC's limits and ordered.
    pub fn is_valid(&self) -> bool {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN};
        (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min_size)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg_size)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size
    }
}

/// The gear tables and masks for one repository; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Gear {
    params: ChunkerParams,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
    mask_s: u64,
    mask_l: u64,
}

impl Gear {
    /// Builds the tables for `params` and `seed`. Normalization level 1, as FastCDC advises.
    pub fn new(params: ChunkerParams, seed: u64) -> Gear {
        let (gear, gear_ls) = get_gear_with_seed(seed);
        let bits = fastcdc::v2020::logarithm2(params.avg_size);
        Gear { params, gear, gear_ls, mask_s: MASKS[(bits + 1) as usize], mask_l: MASKS[(bits - 1) as usize] }
    }

    /// The parameters these tables were built for.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// The length of the first chunk of `data` (all of it when `data` is the end of the stream
    /// and shorter than the minimum).
    pub fn cut(&self, data: &[u8]) -> usize {
        let (_, len) = cut_gear(
            data,
            self.params.min_size as usize,
            self.params.avg_size as usize,
            self.params.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        len
    }
}

/// Splits a reader into content-defined chunks.
#[derive(Debug)]
pub struct Chunker<'g, R> {
    gear: &'g Gear,
    source: R,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<'g, R: Read> Chunker<'g, R> {
    /// A chunker over `source`.
    pub fn new(gear: &'g Gear, source: R) -> Self {
        Self::with_size_hint(gear, source, 64 * 1024)
    }

    /// A chunker over `source`, which is expected to hold about `size` bytes: a small file gets
    /// a buffer just big enough to see its end in one read.
    pub fn with_size_hint(gear: &'g Gear, source: R, size: u64) -> Self {
        let first = (size as usize).saturating_add(1).clamp(4096, 1024 * 1024);
        Chunker { gear, source, buffer: vec![0; first], start: 0, end: 0, eof: false }
    }

    /// The next chunk, borrowed from the internal buffer; `None` at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        let max = self.gear.params.max_size as usize;
        let available = self.end - self.start;
        if available < max && !self.eof {
            // A boundary found strictly inside what is buffered is the one a full window would
            // give (the gear hash and its masks at a position do not depend on what follows), so
            // the buffer is refilled — and its unread bytes moved to the front — only when none
            // is: about once per maximum chunk, not before every chunk.
            if available > self.gear.params.min_size as usize {
                let len = self.gear.cut(&self.buffer[self.start..self.end]);
                if len < available {
                    let chunk_start = self.start;
                    self.start += len;
                    return Ok(Some(&self.buffer[chunk_start..chunk_start + len]));
                }
            }
            self.fill(max)?;
        }
        if self.start == self.end {
            return Ok(None);
        }
        let available = &self.buffer[self.start..self.end];
        // `fill` stops only at end of stream or with at least one maximum chunk buffered.
        let len = self.gear.cut(available);
        let chunk_start = self.start;
        self.start += len;
        Ok(Some(&self.buffer[chunk_start..chunk_start + len]))
    }

    /// Reads until a maximum chunk is buffered or the stream ends, first moving the unread bytes
    /// to the front.
    fn fill(&mut self, max: usize) -> io::Result<()> {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end < max && !self.eof {
            if self.end == self.buffer.len() {
                let grown = (self.buffer.len() * 2).min(2 * max).max(self.end + 1);
                self.buffer.resize(grown, 0);
            }
            match self.source.read(&mut self.buffer[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

/// Small chunk sizes and reproducible data for the chunking tests here and in `content`.
#[cfg(test)]
pub(crate) mod testing {
    use super::{ChunkerParams, Gear};

    /// Chunks of 256 B to 4 KiB, 1 KiB on average.
    pub(crate) fn small_gear() -> Gear {
        Gear::new(ChunkerParams { min_size: 256, avg_size: 1024, max_size: 4096 }, 7)
    }

    /// `len` bytes of xorshift from `seed`.
    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{pseudo_random, small_gear};
    use super::*;
    use proptest::prelude::*;

    fn chunks(gear: &Gear, data: &[u8]) -> Vec<Vec<u8>> {
        let mut chunker = Chunker::new(gear, data);
        let mut out = Vec::new();
        while let Some(chunk) = chunker.next_chunk().unwrap() {
            out.push(chunk.to_vec());
        }
        out
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(chunks(&small_gear(), b"").is_empty());
    }

    proptest! {
        #[test]
        fn chunks_concatenate_to_the_input_within_size_limits(len in 0usize..40_000, seed: u64) {
            let gear = small_gear();
            let data = pseudo_random(len, seed);
            let parts = chunks(&gear, &data);
            prop_assert_eq!(parts.concat(), data);
            for (i, part) in parts.iter().enumerate() {
                prop_assert!(part.len() <= 4096);
                if i + 1 < parts.len() { prop_assert!(part.len() >= 256); }
            }
        }

        #[test]
        fn chunks_are_the_cuts_of_a_full_window_at_every_step(len in 0usize..60_000, seed: u64) {
            // The definition: each chunk is `cut` of the next maximum-size window of the input.
            let gear = small_gear();
            let data = pseudo_random(len, seed);
            let mut expected = Vec::new();
            let mut at = 0;
            while at < data.len() {
                let cut = gear.cut(&data[at..data.len().min(at + 4096)]);
                expected.push(data[at..at + cut].to_vec());
                at += cut;
            }
            prop_assert_eq!(chunks(&gear, &data), expected);
        }

        #[test]
        fn boundaries_do_not_depend_on_how_the_reader_hands_out_bytes(len in 0usize..60_000, seed: u64, step in 1usize..5000) {
            /// Hands out at most `step` bytes a read.
            struct Trickle<'a>(&'a [u8], usize);
            impl Read for Trickle<'_> {
                fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                    let n = buf.len().min(self.1).min(self.0.len());
                    buf[..n].copy_from_slice(&self.0[..n]);
                    self.0 = &self.0[n..];
                    Ok(n)
                }
            }
            let gear = small_gear();
            let data = pseudo_random(len, seed);
            let mut chunker = Chunker::with_size_hint(&gear, Trickle(&data, step), 10);
            let mut trickled = Vec::new();
            while let Some(chunk) = chunker.next_chunk().unwrap() {
                trickled.push(chunk.to_vec());
            }
            prop_assert_eq!(trickled, chunks(&gear, &data));
        }

        #[test]
        fn boundaries_resynchronise_after_an_insertion(seed: u64, at in 0usize..20_000, insert in proptest::collection::vec(any::<u8>(), 1..100)) {
            let gear = small_gear();
            let data = pseudo_random(60_000, seed);
            let mut changed = data[..at].to_vec();
            changed.extend_from_slice(&insert);
            changed.extend_from_slice(&data[at..]);
            let before = chunks(&gear, &data);
            let after = chunks(&gear, &changed);
            // The chunks of the tail well past the insertion are the same chunks.
            let tail_before: std::collections::HashSet<_> = before.iter().rev().take(5).collect();
            let shared = after.iter().rev().take(5).filter(|c| tail_before.contains(c)).count();
            prop_assert!(shared >= 4, "only {} of the last 5 chunks survived an insertion", shared);
        }
    }
}

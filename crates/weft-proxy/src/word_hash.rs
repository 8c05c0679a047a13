//! A fast hasher for the small, non-adversarial keys of per-thread hot-path maps
//! (endpoint addresses, pointer identities).
//!
//! std's SipHash defends against hash flooding, which these maps cannot suffer (their keys
//! come from configuration, not from clients), and costs more than the lookup it serves.

use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-fold over machine words, in the style of rustc's FxHasher.
#[derive(Default)]
pub struct WordHasher(u64);

/// Builds [`WordHasher`]s for `HashMap`.
pub type WordHashBuilder = BuildHasherDefault<WordHasher>;

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.write_u64(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        for byte in chunks.remainder() {
            self.write_u64(*byte as u64);
        }
    }

    fn write_u8(&mut self, word: u8) {
        self.write_u64(word as u64);
    }

    fn write_u16(&mut self, word: u16) {
        self.write_u64(word as u64);
    }

    fn write_u32(&mut self, word: u32) {
        self.write_u64(word as u64);
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::SocketAddr};

    use super::*;

    #[test]
    fn distinct_addresses_stay_distinct() {
        let mut map: HashMap<SocketAddr, u16, WordHashBuilder> = HashMap::default();
        for port in 1..2000u16 {
            map.insert(SocketAddr::from(([127, 0, 0, 1], port)), port);
        }
        assert_eq!(map.len(), 1999);
        assert_eq!(map[&SocketAddr::from(([127, 0, 0, 1], 1234))], 1234);
    }
}

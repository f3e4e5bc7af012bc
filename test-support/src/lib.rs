//! What p2pbridge's tests, benches and soak runs share, kept out of the library crates: seeded
//! randomness, the byte patterns that data is checked against, the Soft-RoCE test fabric
//! ([`fabric`]), and child processes that never outlive a test ([`process`]).
//!
//! Not library API: the library crates take it as a dev-dependency only.

pub mod cli;
pub mod fabric;
pub mod process;

/// xorshift64*: small, seeded, reproducible; not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// `len` bytes that differ with `seed` and along the buffer, so that a stray, partial or
/// shifted copy shows.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(seed as u32 % 31) as u8 ^ seed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence_and_patterns_differ_by_seed() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        assert!((0..1000).all(|_| a.below(10) < 10));
        assert_ne!(pattern(4096, 1), pattern(4096, 2));
        assert_ne!(pattern(4096, 1)[..2048], pattern(4096, 1)[2048..]);
    }
}

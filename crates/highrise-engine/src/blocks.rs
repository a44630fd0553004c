//! The KV cache's blocks: who holds which, and which full blocks of prompt are shared.
//!
//! A block holds `block_size` tokens' keys and values for every layer. A sequence owns a list of
//! blocks (its block table). Blocks are reference-counted so that sequences whose prompts begin the
//! same can share the full blocks of that prefix; a block is found again by the hash of all tokens
//! up to its end. A shared block is never written: only full blocks of prompt are shared, and new
//! tokens always go into a block of their own.

use std::collections::HashMap;

pub struct BlockAllocator {
    block_size: usize,
    free: Vec<u32>,
    refs: Vec<u32>,
    /// Hash of the tokens up to a full block's end -> that block, while some sequence holds it.
    prefix: HashMap<u64, u32>,
    /// The prefix hash each registered block is filed under.
    hash_of: HashMap<u32, u64>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> BlockAllocator {
        BlockAllocator {
            block_size,
            // Popped from the end: hand out low ids first.
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            prefix: HashMap::new(),
            hash_of: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// A fresh block, or `None` when the cache is full.
    pub fn alloc(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Drops one holder of each block; blocks nobody holds return to the free list.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released more often than held");
            *r = r.saturating_sub(1);
            if *r == 0 {
                if let Some(h) = self.hash_of.remove(&b) {
                    self.prefix.remove(&h);
                }
                self.free.push(b);
            }
        }
    }

    /// The chain of prefix hashes of `tokens`' full blocks: entry i covers tokens[..(i+1)*block_size].
    pub fn prefix_hashes(&self, tokens: &[u32]) -> Vec<u64> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        tokens
            .chunks_exact(self.block_size)
            .map(|chunk| {
                for &t in chunk {
                    // FNV-1a over the token ids, chained from block to block.
                    for byte in t.to_le_bytes() {
                        h ^= byte as u64;
                        h = h.wrapping_mul(0x0100_0000_01b3);
                    }
                }
                h
            })
            .collect()
    }

    /// Takes a holder's share of the registered block with prefix hash `h`, if there is one.
    pub fn share(&mut self, h: u64) -> Option<u32> {
        let b = *self.prefix.get(&h)?;
        self.refs[b as usize] += 1;
        Some(b)
    }

    /// Files a block whose tokens are all written under its prefix hash, for later sequences to share.
    pub fn register(&mut self, block: u32, h: u64) {
        if self.hash_of.contains_key(&block) {
            return;
        }
        self.prefix.entry(h).or_insert_with(|| {
            self.hash_of.insert(block, h);
            block
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_when_their_last_holder_lets_go() {
        let mut a = BlockAllocator::new(4, 16);
        let x = a.alloc().unwrap();
        let h = a.prefix_hashes(&[7; 16])[0];
        a.register(x, h);
        assert_eq!(a.share(h), Some(x));
        assert_eq!(a.num_free(), 3);
        a.release(&[x]);
        assert_eq!(a.num_free(), 3, "still held once");
        a.release(&[x]);
        assert_eq!(a.num_free(), 4);
        assert_eq!(a.share(h), None, "a freed block is no longer shared");
    }

    #[test]
    fn prefix_hashes_chain_over_whole_blocks() {
        let a = BlockAllocator::new(1, 2);
        let h1 = a.prefix_hashes(&[1, 2, 3, 4, 5]);
        let h2 = a.prefix_hashes(&[1, 2, 3, 9]);
        assert_eq!(h1.len(), 2);
        assert_eq!(h1[0], h2[0]);
        assert_ne!(h1[1], h2[1]);
        assert_ne!(a.prefix_hashes(&[9, 2, 3, 4])[1], h1[1], "a block's hash depends on what precedes it");
    }
}

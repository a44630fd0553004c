//! The KV cache's blocks: who holds which, and which full blocks of prompt are shared.
//!
//! A block holds `block_size` tokens' keys and values for every layer. A sequence owns a list of
//! blocks (its block table). Blocks are reference-counted so that sequences whose prompts begin the
//! same can share the full blocks of that prefix. A shared block is never written: only full blocks
//! of prompt are shared, and new tokens always go into a block of their own.
//!
//! A block is shared only where its keys and values would be the same: it is found by a key that
//! chains SHA-256 (vLLM's choice, collision-resistant) over a salt (what changes the K/V besides the
//! tokens: a request's steering), the key of the block before it, and its own tokens; and a match is
//! checked against the tokens and the previous key it was filed with, so that even a collision never
//! serves another prompt's K/V.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// Tokens per KV-cache block: the model's own (`highrise_model::llama::BLOCK_SIZE`, which its
/// single-sequence prefill uses too), one definition for both.
pub use highrise_model::llama::BLOCK_SIZE;

/// Identifies a full block of prompt with everything before it: see the module's doc.
pub type BlockKey = [u8; 32];

/// The salt of a sequence whose K/V depend on its tokens alone.
pub const PLAIN: BlockKey = [0; 32];

/// What a registered block was filed with, checked again when it is shared.
struct Filed {
    key: BlockKey,
    parent: BlockKey,
    tokens: Vec<u32>,
}

pub struct BlockAllocator {
    block_size: usize,
    free: Vec<u32>,
    refs: Vec<u32>,
    /// Prefix key -> that block, while some sequence holds it.
    prefix: HashMap<BlockKey, u32>,
    /// What each registered block was filed with.
    filed: HashMap<u32, Filed>,
}

/// A salt from the bytes of whatever besides the tokens changes a sequence's keys and values.
pub fn salt(parts: &[&[u8]]) -> BlockKey {
    if parts.iter().all(|p| p.is_empty()) {
        return PLAIN;
    }
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> BlockAllocator {
        BlockAllocator {
            block_size,
            // Popped from the end: hand out low ids first.
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            prefix: HashMap::new(),
            filed: HashMap::new(),
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
                if let Some(f) = self.filed.remove(&b) {
                    self.prefix.remove(&f.key);
                }
                self.free.push(b);
            }
        }
    }

    /// The chain of keys of `tokens`' full blocks under `salt`: entry i covers
    /// tokens[..(i+1)*block_size].
    fn prefix_keys(&self, salt: &BlockKey, tokens: &[u32]) -> Vec<BlockKey> {
        let mut key = *salt;
        tokens
            .chunks_exact(self.block_size)
            .map(|chunk| {
                let mut h = Sha256::new();
                h.update(key);
                for &t in chunk {
                    h.update(t.to_le_bytes());
                }
                key = h.finalize().into();
                key
            })
            .collect()
    }

    /// Takes a holder's share of the registered block `key` names, if there is one and it was filed
    /// with these `tokens` after `parent` (the previous block's key, or the salt for the first).
    fn share(&mut self, key: &BlockKey, parent: &BlockKey, tokens: &[u32]) -> Option<u32> {
        let b = *self.prefix.get(key)?;
        let f = self.filed.get(&b)?;
        if &f.parent != parent || f.tokens != tokens {
            return None;
        }
        self.refs[b as usize] += 1;
        Some(b)
    }

    /// Files a block whose tokens are all written, for later sequences to share.
    fn register(&mut self, block: u32, key: BlockKey, parent: BlockKey, tokens: &[u32]) {
        if self.filed.contains_key(&block) || self.prefix.contains_key(&key) {
            return;
        }
        self.prefix.insert(key, block);
        self.filed.insert(block, Filed { key, parent, tokens: tokens.to_vec() });
    }

    /// Takes a share of each full block of `tokens` (under `salt`) already filed, from the first,
    /// until one is not: the blocks a new sequence with this prompt can start from.
    pub fn share_prefix(&mut self, salt: &BlockKey, tokens: &[u32]) -> Vec<u32> {
        let keys = self.prefix_keys(salt, tokens);
        let mut shared = Vec::new();
        for (b, (key, chunk)) in keys.iter().zip(tokens.chunks_exact(self.block_size)).enumerate() {
            let parent = if b == 0 { *salt } else { keys[b - 1] };
            match self.share(key, &parent, chunk) {
                Some(block) => shared.push(block),
                None => break,
            }
        }
        shared
    }

    /// Files `blocks[from..]`, the sequence's blocks holding its full blocks of `tokens` (under
    /// `salt`) from block `from` on, for later sequences to share.
    pub fn register_prefix(&mut self, salt: &BlockKey, tokens: &[u32], blocks: &[u32], from: usize) {
        let keys = self.prefix_keys(salt, tokens);
        for (b, chunk) in tokens.chunks_exact(self.block_size).enumerate().skip(from) {
            let parent = if b == 0 { *salt } else { keys[b - 1] };
            self.register(blocks[b], keys[b], parent, chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_when_their_last_holder_lets_go() {
        let mut a = BlockAllocator::new(4, 16);
        let x = a.alloc().unwrap();
        let k = a.prefix_keys(&PLAIN, &[7; 16])[0];
        a.register(x, k, PLAIN, &[7; 16]);
        assert_eq!(a.share(&k, &PLAIN, &[7; 16]), Some(x));
        assert_eq!(a.num_free(), 3);
        a.release(&[x]);
        assert_eq!(a.num_free(), 3, "still held once");
        a.release(&[x]);
        assert_eq!(a.num_free(), 4);
        assert_eq!(a.share(&k, &PLAIN, &[7; 16]), None, "a freed block is no longer shared");
    }

    #[test]
    fn prefix_keys_chain_over_whole_blocks() {
        let a = BlockAllocator::new(1, 2);
        let k1 = a.prefix_keys(&PLAIN, &[1, 2, 3, 4, 5]);
        let k2 = a.prefix_keys(&PLAIN, &[1, 2, 3, 9]);
        assert_eq!(k1.len(), 2);
        assert_eq!(k1[0], k2[0]);
        assert_ne!(k1[1], k2[1]);
        assert_ne!(a.prefix_keys(&PLAIN, &[9, 2, 3, 4])[1], k1[1], "a block's key depends on what precedes it");
        let steered = salt(&[b"layer 3", &[1, 2, 3]]);
        assert_ne!(steered, PLAIN);
        assert_ne!(a.prefix_keys(&steered, &[1, 2])[0], k1[0], "and on the salt");
        assert_eq!(salt(&[b"", b""]), PLAIN, "nothing besides the tokens: the plain salt");
    }

    #[test]
    fn a_block_is_shared_only_with_the_tokens_and_parent_it_was_filed_with() {
        let mut a = BlockAllocator::new(4, 2);
        let x = a.alloc().unwrap();
        let k = a.prefix_keys(&PLAIN, &[5, 6])[0];
        a.register(x, k, PLAIN, &[5, 6]);
        // Even under its own key (a collision), other tokens or another parent find nothing.
        assert_eq!(a.share(&k, &PLAIN, &[5, 7]), None);
        assert_eq!(a.share(&k, &[1; 32], &[5, 6]), None);
        assert_eq!(a.share(&k, &PLAIN, &[5, 6]), Some(x));
    }

    #[test]
    fn a_filed_prefix_is_shared_under_its_own_salt_only() {
        let mut a = BlockAllocator::new(8, 2);
        let blocks = [a.alloc().unwrap(), a.alloc().unwrap(), a.alloc().unwrap()];
        let tokens = [1, 2, 3, 4, 5, 6];
        a.register_prefix(&PLAIN, &tokens, &blocks, 0);
        assert_eq!(a.share_prefix(&PLAIN, &tokens), blocks, "the whole prompt");
        assert_eq!(a.share_prefix(&PLAIN, &[1, 2, 3, 9, 5, 6]), blocks[..1], "up to the first block that differs");
        assert!(a.share_prefix(&salt(&[b"steered"]), &tokens).is_empty(), "another salt shares nothing");
    }
}

//! The key/value stream: RoPE, writing K/V into the paged cache, and attention reading them either
//! straight from the prompt (prefill) or through block tables (decode, chunked prefill).
//!
//! Both attention ops share one kernel. Work is split into units of (sequence, K/V head, block of
//! queries); a unit gathers its K/V head's rows once into f32, then serves every query head of its
//! group from them, so K/V are never copied per query head. Within a unit, scores and the weighted
//! sum of values are two GEMMs over the stacked queries of the group.

use highrise_core::ops::{cache_dims, Attention, KvWrite, PagedAttention, Rope, Scores};
use highrise_core::{Element, Result};

use crate::float::{with_float, Float};
use crate::team::min_items;
use crate::storage::Tensors;
use crate::team::Team;

pub fn rope(ts: &Tensors, op: &Rope) -> Result<()> {
    let [heads, d] = [op.x.dims()[1], op.x.dims()[2]];
    let inv_freq = op.config.inv_freq(d);
    let m = op.config.attention_factor();
    let positions = op.positions.as_slice();
    // Partial RoPE: the first `rot` dims rotate (i with i + rot/2), the rest pass through.
    let half = inv_freq.len();
    with_float!(op.x.dtype, "rope", E => {
        // SAFETY: x is the op's only tensor.
        let x = unsafe { ts.slice_mut::<E>("x", &op.x)? };
        ts.team.rows(x, heads * d, min_items(heads * d), |t0, tokens| {
            let (mut cos, mut sin, mut row) = (vec![0f32; half], vec![0f32; half], vec![0f32; d]);
            for (token, &pos) in tokens.chunks_exact_mut(heads * d).zip(&positions[t0..]) {
                for (i, f) in inv_freq.iter().enumerate() {
                    let angle = pos as f64 * f;
                    (cos[i], sin[i]) = (angle.cos() as f32 * m, angle.sin() as f32 * m);
                }
                for head in token.chunks_exact_mut(d) {
                    E::load(head, &mut row);
                    let (lo, hi) = row[..2 * half].split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = b * cos[i] + a * sin[i];
                    }
                    E::store(&row, head);
                }
            }
        });
        Ok(())
    })
}

pub fn kv_write(ts: &Tensors, op: &KvWrite) -> Result<()> {
    let [_, block_size, hkv, d] = cache_dims(&op.k_cache);
    let row = hkv * d;
    with_float!(op.k.dtype, "kv_write", E => {
        let (k, v) = (ts.slice::<E>("k", &op.k)?, ts.slice::<E>("v", &op.v)?);
        with_float!(op.k_cache.dtype, "kv_write", C => {
            // SAFETY: the caches are the op's outputs, distinct from each other and from k, v (validated).
            let k_cache = unsafe { ts.slice_mut::<C>("k_cache", &op.k_cache)? };
            let v_cache = unsafe { ts.slice_mut::<C>("v_cache", &op.v_cache)? };
            let mut buf = vec![0f32; if E::DTYPE == C::DTYPE { 0 } else { d }];
            // A head's row in the cache's dtype: copied as it is, or rounded through f32.
            let mut put = |dst: &mut [C], src: &[E]| match bytemuck::try_cast_slice::<E, C>(src) {
                Ok(same) if E::DTYPE == C::DTYPE => dst.copy_from_slice(same),
                _ => {
                    E::load(src, &mut buf);
                    C::store(&buf, dst);
                }
            };
            for (t, &slot) in op.slots.as_slice().iter().enumerate() {
                let (block, offset) = (slot as usize / block_size, slot as usize % block_size);
                for g in 0..hkv {
                    let at = ((block * hkv + g) * block_size + offset) * d;
                    let src = t * row + g * d;
                    put(&mut k_cache[at..at + d], &k[src..src + d]);
                    put(&mut v_cache[at..at + d], &v[src..src + d]);
                }
            }
            Ok(())
        })
    })
}

/// One sequence as the kernel sees it: where its queries are, and how much context they see.
#[derive(Clone, Copy)]
struct Seq {
    q_start: usize,
    q_len: usize,
    context_len: usize,
    /// Query i sees up to its own position (else the whole context).
    causal: bool,
}

/// Where the K/V rows of a sequence live.
trait KvSource<E>: Sync {
    /// The K (or V) rows of K/V head `g` at context positions `keys` of sequence `seq`, in order.
    fn rows<'a>(&self, cache: &'a [E], seq: usize, keys: std::ops::Range<usize>, g: usize) -> Vec<&'a [E]>;

    /// Where the row of K/V head `g` at position `pos` of `seq` starts and the distance from one
    /// position's row to the next, where all rows lie at one stride (a GEMM reads them in place).
    fn strided(&self, seq: usize, pos: usize, g: usize) -> Option<(usize, usize)> {
        let _ = (seq, pos, g);
        None
    }
}

/// K/V of whole prompts laid end to end: [T, kv_heads, D].
struct Contiguous {
    starts: Vec<usize>,
    hkv: usize,
    d: usize,
}

impl<E> KvSource<E> for Contiguous {
    fn rows<'a>(&self, kv: &'a [E], seq: usize, keys: std::ops::Range<usize>, g: usize) -> Vec<&'a [E]> {
        let row = |pos: usize| (self.starts[seq] + pos) * self.hkv + g;
        keys.map(|pos| &kv[row(pos) * self.d..(row(pos) + 1) * self.d]).collect()
    }

    fn strided(&self, seq: usize, pos: usize, g: usize) -> Option<(usize, usize)> {
        Some((((self.starts[seq] + pos) * self.hkv + g) * self.d, self.hkv * self.d))
    }
}

/// K/V in the paged cache [blocks, kv_heads, block_size, D], found through each block table.
struct Paged<'t> {
    table: &'t [u32],
    blocks_start: Vec<usize>,
    block_size: usize,
    hkv: usize,
    d: usize,
}

impl<E> KvSource<E> for Paged<'_> {
    /// A block's rows of one head lie together: one table lookup per block, not per row.
    fn rows<'a>(&self, cache: &'a [E], seq: usize, keys: std::ops::Range<usize>, g: usize) -> Vec<&'a [E]> {
        let (bs, d) = (self.block_size, self.d);
        let mut out = Vec::with_capacity(keys.len());
        let mut pos = keys.start;
        while pos < keys.end {
            let (b, first) = (pos / bs, pos % bs);
            let n = (bs - first).min(keys.end - pos);
            let at = ((self.table[self.blocks_start[seq] + b] as usize * self.hkv + g) * bs + first) * d;
            out.extend(cache[at..at + n * d].chunks_exact(d));
            pos += n;
        }
        out
    }
}

pub fn attention(ts: &Tensors, op: &Attention) -> Result<()> {
    let [hq, d] = [op.q.dims()[1], op.q.dims()[2]];
    let hkv = op.k.dims()[1];
    let mut seqs = Vec::new();
    let mut starts = Vec::new();
    let mut at = 0;
    for &len in op.seq_lens.as_slice() {
        let len = len as usize;
        seqs.push(Seq { q_start: at, q_len: len, context_len: len, causal: op.causal });
        starts.push(at);
        at += len;
    }
    let src = Contiguous { starts, hkv, d };
    with_float!(op.out.dtype, "attention", E => {
        let (q, k, v) = (ts.slice::<E>("q", &op.q)?, ts.slice::<E>("k", &op.k)?, ts.slice::<E>("v", &op.v)?);
        // SAFETY: out is the only output and aliases no input (validated).
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        attend(ts.team, out, q, k, v, &src, &seqs, hq, hkv, d, op.scores);
        Ok(())
    })
}

pub fn paged_attention(ts: &Tensors, op: &PagedAttention) -> Result<()> {
    let [hq, d] = [op.q.dims()[1], op.q.dims()[2]];
    let [_, block_size, hkv, _] = cache_dims(&op.k_cache);
    let mut seqs = Vec::new();
    let mut blocks_start = Vec::new();
    let mut at = 0;
    for s in op.seqs.as_slice() {
        seqs.push(Seq { q_start: at, q_len: s.q_len as usize, context_len: s.context_len as usize, causal: true });
        blocks_start.push(s.blocks_start as usize);
        at += s.q_len as usize;
    }
    let src = Paged { table: op.block_table.as_slice(), blocks_start, block_size, hkv, d };
    with_float!(op.out.dtype, "paged_attention", E => {
        let q = ts.slice::<E>("q", &op.q)?;
        // SAFETY: out is the only output and aliases no input (validated).
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        // The cache may keep another float dtype than the activations (f16 beside f32).
        with_float!(op.k_cache.dtype, "paged_attention", C => {
            let (k, v) = (ts.slice::<C>("k_cache", &op.k_cache)?, ts.slice::<C>("v_cache", &op.v_cache)?);
            attend(ts.team, out, q, k, v, &src, &seqs, hq, hkv, d, op.scores);
            Ok(())
        })
    })
}

/// `row = exp(cap(row) + bias - max) / sum`, in place (`cap`: the scores' soft-cap, if any; `bias`:
/// ALiBi's, `slope * (dist0 + j)` at the row's j-th key, dist0 the first key's distance from the
/// row's last visible one, none where the slope is 0); returns the row's log-sum-exp, `max +
/// ln(sum)`.
#[inline(always)]
fn softmax(row: &mut [f32], scores: &Scores, (slope, dist0): (f32, f32)) -> f32 {
    if scores.softcap > 0.0 {
        row.iter_mut().for_each(|v| *v = scores.cap(*v));
    }
    if slope != 0.0 {
        row.iter_mut().enumerate().for_each(|(j, v)| *v += slope * (dist0 + j as f32));
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    // Each term as close as libm's expf (see exp_sub): attention's probabilities feed the residual
    // stream, which the tests hold to HF's within 1e-3.
    let sum = crate::simd::exp_sub(row, max);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
    max + sum.ln()
}

/// Attention output and each row's log-sum-exp of scores, over some of the keys: parts of one
/// context combine into the whole (`merge_parts`).
type Part = (Vec<f32>, Vec<f32>);

/// ALiBi's part of one `attend_one`: each row's slope (none: empty), and the first key's distance
/// from the last key the rows see (0 or less).
type Bias<'s> = (&'s [f32], f32);

/// Row r's (slope, first distance) of `bias`.
fn row_bias((slopes, dist0): Bias, r: usize) -> (f32, f32) {
    (slopes.get(r).copied().unwrap_or(0.0), dist0)
}

/// Attention of `qs` (rows of D, all at the same position) over the keys and values in the rows
/// `key` and `value` (each D long, in the cache's dtype): scores, softmax, weighted sum. Returns
/// [rows, D] and each row's log-sum-exp.
fn attend_one<E: Float>(qs: &[f32], key: &[&[E]], value: &[&[E]], d: usize, scores: &Scores, bias: Bias) -> Part {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() && d.is_multiple_of(8) {
        // Rows read where they lie, in the cache's own dtype (an f16 cache widens in registers: half
        // the bytes from memory, no copy).
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); D is whole vectors of 8.
        return unsafe { avx2::attend_one(qs, key, value, d, scores, bias) };
    }
    // Portable: f32 rows read where they lie, others widened once.
    fn widen<'r, E: Float>(rows: &[&'r [E]], d: usize) -> Vec<std::borrow::Cow<'r, [f32]>> {
        rows.iter()
            .map(|r| match E::as_f32(r) {
                Some(x) => std::borrow::Cow::Borrowed(x),
                None => {
                    let mut w = vec![0f32; d];
                    E::load(&r[..d], &mut w);
                    std::borrow::Cow::Owned(w)
                }
            })
            .collect()
    }
    let (k, v) = (widen(key, d), widen(value, d));
    let (k, v): (Vec<&[f32]>, Vec<&[f32]>) = (k.iter().map(|r| &r[..]).collect(), v.iter().map(|r| &r[..]).collect());
    attend_one_portable(qs, &k, &v, d, scores, bias)
}

/// `attend_one` over the rows of K and V (each at least D long).
fn attend_one_portable(qs: &[f32], key: &[&[f32]], value: &[&[f32]], d: usize, sc: &Scores, bias: Bias) -> Part {
    let (rows, len) = (qs.len() / d, key.len());
    let mut scores = vec![0f32; rows * len];
    for (pos, kr) in key.iter().enumerate() {
        for r in 0..rows {
            scores[r * len + pos] = crate::simd::dot(&qs[r * d..(r + 1) * d], kr) * sc.scale;
        }
    }
    let lse = scores.chunks_exact_mut(len.max(1)).enumerate().map(|(r, row)| softmax(row, sc, row_bias(bias, r))).collect();
    let mut out = vec![0f32; rows * d];
    for (pos, vr) in value.iter().enumerate() {
        for r in 0..rows {
            let p = scores[r * len + pos];
            out[r * d..(r + 1) * d].iter_mut().zip(*vr).for_each(|(o, v)| *o += p * v);
        }
    }
    (out, lse)
}

/// One output from the parts of a context, each normalized over its own keys: part p weighs
/// `e^(lse_p - lse)`, lse the log-sum-exp over all keys. `parts` hold [rows, D] and rows' lse.
fn merge_parts(parts: &[&Part], d: usize) -> Vec<f32> {
    let rows = parts[0].1.len();
    let mut out = vec![0f32; rows * d];
    for r in 0..rows {
        let max = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.1[r]));
        let total: f32 = parts.iter().map(|p| (p.1[r] - max).exp()).sum();
        for p in parts {
            let w = (p.1[r] - max).exp() / total;
            out[r * d..(r + 1) * d].iter_mut().zip(&p.0[r * d..(r + 1) * d]).for_each(|(o, v)| *o += w * v);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::float::Float;

    /// How many rows ahead of the one in use attention prefetches K and V.
    const PREFETCH_ROWS: usize = 24;

    /// Fetches the row `PREFETCH_ROWS` after `pos`, if any, into cache: rows of a cache block are a
    /// page or so of their own, and the hardware's prefetchers stop at page boundaries.
    #[inline(always)]
    unsafe fn fetch_ahead<E>(rows: &[&[E]], pos: usize) {
        if let Some(r) = rows.get(pos + PREFETCH_ROWS) {
            for line in (0..std::mem::size_of_val(*r)).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>((r.as_ptr() as *const i8).add(line));
            }
        }
    }

    /// `attend_one` for D a multiple of 8. Scores: eight keys per pass, one accumulator per key (eight
    /// independent FMA chains), reduced together into one vector of eight scores. Weighted sum: a
    /// tile of 16 output columns for up to 6 rows at a time, so each value row is loaded once per
    /// tile and serves every row (query head) of the group.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_one<E: Float>(qs: &[f32], key: &[&[E]], value: &[&[E]], d: usize, sc: &super::Scores, bias: super::Bias) -> super::Part {
        let scale = sc.scale;
        let (rows, len) = (qs.len() / d, key.len());
        assert!(value.len() == len && key.iter().chain(value).all(|r| r.len() >= d));
        let mut scores = vec![0f32; rows * len];
        let mut pos = 0;
        while pos + 8 <= len {
            let ks: [*const E; 8] = std::array::from_fn(|i| key[pos + i].as_ptr());
            for i in 0..8 {
                fetch_ahead(key, pos + i);
            }
            for r in 0..rows {
                let q = qs.as_ptr().add(r * d);
                let mut a = [_mm256_setzero_ps(); 8];
                for c in (0..d).step_by(8) {
                    let qv = _mm256_loadu_ps(q.add(c));
                    for (a, k) in a.iter_mut().zip(ks) {
                        *a = _mm256_fmadd_ps(qv, E::load8(k.add(c)), *a);
                    }
                }
                // [a0 a1 a2 a3 | a4 a5 a6 a7] lane sums: pairwise adds, then the two halves.
                let h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                let h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
                let s = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
                _mm256_storeu_ps(scores.as_mut_ptr().add(r * len + pos), _mm256_mul_ps(s, _mm256_set1_ps(scale)));
            }
            pos += 8;
        }
        while pos < len {
            let k = key[pos].as_ptr();
            for r in 0..rows {
                let q = qs.as_ptr().add(r * d);
                let mut a = _mm256_setzero_ps();
                for c in (0..d).step_by(8) {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), E::load8(k.add(c)), a);
                }
                let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                let s = _mm_hadd_ps(_mm_hadd_ps(s, s), s);
                scores[r * len + pos] = _mm_cvtss_f32(s) * scale;
            }
            pos += 1;
        }
        let lse = scores.chunks_exact_mut(len.max(1)).enumerate().map(|(r, row)| super::softmax(row, sc, super::row_bias(bias, r))).collect();
        let mut out = vec![0f32; rows * d];
        for r0 in (0..rows).step_by(6) {
            match rows - r0 {
                1 => weighted_sum::<E, 1>(&scores, value, r0, d, &mut out),
                2 => weighted_sum::<E, 2>(&scores, value, r0, d, &mut out),
                3 => weighted_sum::<E, 3>(&scores, value, r0, d, &mut out),
                4 => weighted_sum::<E, 4>(&scores, value, r0, d, &mut out),
                5 => weighted_sum::<E, 5>(&scores, value, r0, d, &mut out),
                _ => weighted_sum::<E, 6>(&scores, value, r0, d, &mut out),
            }
        }
        (out, lse)
    }

    /// `out[r] = sum_pos p[r][pos] * value[pos]` for rows r0..r0 + R; `p` [rows, len].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted_sum<E: Float, const R: usize>(p: &[f32], value: &[&[E]], r0: usize, d: usize, out: &mut [f32]) {
        let len = value.len();
        let ps: [*const f32; R] = std::array::from_fn(|r| p.as_ptr().add((r0 + r) * len));
        for c in (0..d).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            if c + 16 <= d {
                for (pos, v) in value.iter().enumerate() {
                    if c == 0 {
                        fetch_ahead(value, pos);
                    }
                    let v = v.as_ptr().add(c);
                    let (v0, v1) = (E::load8(v), E::load8(v.add(8)));
                    for (a, p) in acc.iter_mut().zip(ps) {
                        let p = _mm256_broadcast_ss(&*p.add(pos));
                        a[0] = _mm256_fmadd_ps(p, v0, a[0]);
                        a[1] = _mm256_fmadd_ps(p, v1, a[1]);
                    }
                }
            } else {
                for (pos, v) in value.iter().enumerate() {
                    let v0 = E::load8(v.as_ptr().add(c));
                    for (a, p) in acc.iter_mut().zip(ps) {
                        a[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*p.add(pos)), v0, a[0]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let o = out.as_mut_ptr().add((r0 + r) * d + c);
                _mm256_storeu_ps(o, a[0]);
                if c + 16 <= d {
                    _mm256_storeu_ps(o.add(8), a[1]);
                }
            }
        }
    }
}

/// Queries per work unit: small enough to spread one long prompt over the threads, large enough
/// that the two GEMMs' packing of K and V is shared by many rows (64 against 32: the default
/// model's 512-token prompt attention 14-22% faster on 2 cores).
const Q_BLOCK: usize = 64;

/// Attention: query i of a sequence sits at position `context_len - q_len + i` and attends to
/// positions 0..=that (causal; from `scores.first_key` of it with a sliding window), or to the whole
/// context. q, out [T, hq, D].
#[allow(clippy::too_many_arguments)]
fn attend<E: Float, C: Float, S: KvSource<C>>(
    team: &Team,
    out: &mut [E],
    q: &[E],
    k: &[C],
    v: &[C],
    src: &S,
    seqs: &[Seq],
    hq: usize,
    hkv: usize,
    d: usize,
    scores: Scores,
) {
    let group = hq / hkv;
    // (sequence, kv head, first query, queries)
    let blocks: Vec<(usize, usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, seq)| {
            (0..hkv).flat_map(move |g| {
                (0..seq.q_len).step_by(Q_BLOCK).map(move |i0| (s, g, i0, Q_BLOCK.min(seq.q_len - i0)))
            })
        })
        .collect();
    // Keys a block can see: up to its last query's position (causal), or all; from its first
    // query's first key (a sliding window; else 0).
    let visible = |&(s, _, i0, n): &(usize, usize, usize, usize)| match seqs[s].causal {
        true => seqs[s].context_len - seqs[s].q_len + i0 + n,
        false => seqs[s].context_len,
    };
    let first = |&(s, _, i0, _): &(usize, usize, usize, usize)| match seqs[s].causal {
        true => scores.first_key(seqs[s].context_len - seqs[s].q_len + i0),
        false => 0,
    };
    // A decode step has few blocks (one per K/V head: 3 for the default model, on 2 threads): one
    // query's context is split into parts (flash-decoding) so every thread gets an even share;
    // parts are merged by their log-sum-exp. Parts keep at least MIN_PART_KEYS keys.
    const MIN_PART_KEYS: usize = 32;
    let want_parts = (4 * team.threads()).div_ceil(blocks.len().max(1));
    // (block, keys): units of work, the parts of a block side by side.
    let units: Vec<(usize, std::ops::Range<usize>)> = blocks
        .iter()
        .enumerate()
        .flat_map(|(b, blk)| {
            let (lo, len) = (first(blk), visible(blk) - first(blk));
            let parts = if blk.3 == 1 { want_parts.min(len / MIN_PART_KEYS).max(1) } else { 1 };
            (0..parts).map(move |p| (b, lo + p * len / parts..lo + (p + 1) * len / parts))
        })
        .collect();
    // Score-and-sum work of all units; a tiny total stays on one thread.
    let work: usize = blocks.iter().map(|b| b.3 * (visible(b) - first(b))).sum();
    let unit = |(b, keys): &(usize, std::ops::Range<usize>)| -> Part {
            let (s, g, i0, n) = blocks[*b];
            let seq = seqs[s];
            let first_pos = seq.context_len - seq.q_len;
            let (lo, visible) = (first(&blocks[*b]), visible(&blocks[*b]) - first(&blocks[*b]));
            // The unit's queries, group heads stacked: row i * group + hh is query i, head g*group+hh.
            let rows = n * group;
            let mut qs = vec![0f32; rows * d];
            for i in 0..n {
                let row = (seq.q_start + i0 + i) * hq + g * group;
                E::load(&q[row * d..(row + group) * d], &mut qs[i * group * d..(i + 1) * group * d]);
            }
            // ALiBi's slope of each row's head (row i * group + hh: head g * group + hh).
            let slopes: Vec<f32> = match scores.alibi > 0.0 {
                true => (0..rows).map(|r| scores.alibi_slope(g * group + r % group, hq)).collect(),
                false => Vec::new(),
            };
            if n == 1 {
                // Decode: one query position. Each cached K/V row is read once, straight from the
                // cache, and serves every head of the group; nothing is gathered. The part's first
                // key lies `keys.start - (lo + visible - 1)` from the last the query sees.
                let bias = (&slopes[..], keys.start as f32 - (lo + visible - 1) as f32);
                return attend_one(&qs, &src.rows(k, s, keys.clone(), g), &src.rows(v, s, keys.clone(), g), d, &scores, bias);
            }
            // K and V rows: read in place where they are f32 at one stride (a prompt's own), else
            // gathered (through a block table) and widened into [visible, D].
            let gathered: (Vec<f32>, Vec<f32>);
            let (kp, vp, stride) = match (C::as_f32(k), C::as_f32(v), src.strided(s, lo, g)) {
                (Some(kf), Some(vf), Some((at, stride))) if visible > 0 => {
                    let end = at + (visible - 1) * stride + d;
                    (kf[at..end].as_ptr(), vf[at..end].as_ptr(), stride)
                }
                _ => {
                    let (mut ks, mut vs) = (vec![0f32; visible * d], vec![0f32; visible * d]);
                    let keys = lo..lo + visible;
                    for (pos, (kr, vr)) in src.rows(k, s, keys.clone(), g).into_iter().zip(src.rows(v, s, keys, g)).enumerate() {
                        C::load(kr, &mut ks[pos * d..(pos + 1) * d]);
                        C::load(vr, &mut vs[pos * d..(pos + 1) * d]);
                    }
                    gathered = (ks, vs);
                    (gathered.0.as_ptr(), gathered.1.as_ptr(), d)
                }
            };
            // Scores [rows, visible] = scale * Q K^T, then a softmax per row (causal: over the keys
            // up to its position, from the window's first), then P V: two GEMMs instead of one dot
            // product per key.
            let mut p = vec![0f32; rows * visible];
            let mut res = vec![0f32; rows * d];
            // SAFETY: every pointer and stride describes a buffer of those dimensions: qs [rows, d],
            // p [rows, visible] and res [rows, d] allocated here, K and V [visible, d] rows `stride`
            // apart (a slice checked above to hold them all, or ks and vs).
            unsafe {
                matrixmultiply::sgemm(
                    rows, d, visible, scores.scale,
                    qs.as_ptr(), d as isize, 1,
                    kp, 1, stride as isize,
                    0.0, p.as_mut_ptr(), visible as isize, 1,
                );
            }
            for (r, row) in p.chunks_exact_mut(visible).enumerate() {
                let (from, to) = match seq.causal {
                    true => {
                        let pos = first_pos + i0 + r / group;
                        (scores.first_key(pos) - lo, pos + 1 - lo)
                    }
                    false => (0, visible),
                };
                let (before, rest) = row.split_at_mut(from);
                let (seen, after) = rest.split_at_mut(to - from);
                // The last key seen is the row's last: ALiBi's distances end at 0 there.
                softmax(seen, &scores, row_bias((&slopes, 1.0 - seen.len() as f32), r));
                before.fill(0.0);
                after.fill(0.0);
            }
            // SAFETY: as above.
            unsafe {
                matrixmultiply::sgemm(
                    rows, visible, d, 1.0,
                    p.as_ptr(), visible as isize, 1,
                    vp, stride as isize, 1,
                    0.0, res.as_mut_ptr(), d as isize, 1,
                );
            }
            (res, Vec::new())
    };
    // Units are worth spreading sooner than elementwise work: a decode step's few units (one per K/V
    // head) each read a whole context.
    let results: Vec<Part> = if work * group * d < crate::team::PAR_MIN_ELEMS / 8 {
        units.iter().map(unit).collect()
    } else {
        team.map(units.len(), |i| unit(&units[i]))
    };
    let mut at = 0;
    for (b, &(s, g, i0, n)) in blocks.iter().enumerate() {
        let parts = units[at..].iter().take_while(|u| u.0 == b).count();
        let merged;
        let res = match parts {
            1 => &results[at].0,
            _ => {
                merged = merge_parts(&results[at..at + parts].iter().collect::<Vec<_>>(), d);
                &merged
            }
        };
        at += parts;
        for i in 0..n {
            let row = (seqs[s].q_start + i0 + i) * hq + g * group;
            E::store(&res[i * group * d..(i + 1) * group * d], &mut out[row * d..(row + group) * d]);
        }
    }
}

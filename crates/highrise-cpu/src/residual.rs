//! Residual-stream ops: embedding gather, RMSNorm, the fused residual-add + RMSNorm, LayerNorm (with
//! or without the add), and a mixture of experts' weighted combine (`index_add`).

use half::{bf16, f16};
use highrise_core::ops::{AddRmsNorm, Embedding, IndexAdd, LayerNorm, RmsNorm};
use highrise_core::quant::dequantize;
use highrise_core::{DType, Error, Result, TensorRef};

use crate::float::{with_float, Float};
use crate::team::min_items;
use crate::storage::Tensors;

/// A small float tensor (a norm weight, a bias) read into f32.
pub fn to_f32_vec(ts: &Tensors, name: &str, t: &TensorRef) -> Result<Vec<f32>> {
    let mut v = vec![0f32; t.numel()];
    with_float!(t.dtype, name, W => {
        W::load(ts.slice::<W>(name, t)?, &mut v);
        Ok(())
    })?;
    Ok(v)
}

pub fn embedding(ts: &Tensors, op: &Embedding) -> Result<()> {
    let hidden = op.table.dims()[1];
    with_float!(op.out.dtype, "embedding", E => {
        // SAFETY: out is the op's only output.
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        let ids = op.ids.as_slice();
        match op.table.dtype {
            DType::F32 => gather::<f32, E>(out, ts.slice("table", &op.table)?, ids, hidden, op.scale),
            DType::F16 => gather::<f16, E>(out, ts.slice("table", &op.table)?, ids, hidden, op.scale),
            DType::BF16 => gather::<bf16, E>(out, ts.slice("table", &op.table)?, ids, hidden, op.scale),
            q => {
                // A quantized table is read in place: each row's blocks dequantized as it is gathered.
                let table = ts.slice::<u8>("table", &op.table)?;
                let row_bytes = q.storage_bytes(hidden).ok_or_else(|| {
                    Error::Invalid(format!("embedding: rows of {hidden} are not whole {q} blocks"))
                })?;
                let mut row = vec![0f32; hidden];
                for (dst, &id) in out.chunks_exact_mut(hidden).zip(ids) {
                    let id = id as usize;
                    dequantize(q, &table[id * row_bytes..(id + 1) * row_bytes], &mut row)?;
                    scale_row(&mut row, op.scale);
                    E::store(&row, dst);
                }
            }
        }
        Ok(())
    })
}

/// `out[index[j]] += weight[j] * src[j]`: each product in f32, added to the row as out holds it,
/// rounded once (the indices are distinct: validated).
pub fn index_add(ts: &Tensors, op: &IndexAdd) -> Result<()> {
    let h = op.out.dims()[1];
    with_float!(op.out.dtype, "index_add", E => {
        // SAFETY: out is the op's only output (validated not to alias src).
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        let src = ts.slice::<E>("src", &op.src)?;
        let (mut row, mut add) = (vec![0f32; h], vec![0f32; h]);
        for ((s, &i), &w) in src.chunks_exact(h).zip(op.index.as_slice()).zip(op.weight.as_slice()) {
            let dst = &mut out[i as usize * h..(i as usize + 1) * h];
            E::load(dst, &mut row);
            E::load(s, &mut add);
            row.iter_mut().zip(&add).for_each(|(r, a)| *r += w * a);
            E::store(&row, dst);
        }
        Ok(())
    })
}

fn gather<W: Float, E: Float>(out: &mut [E], table: &[W], ids: &[u32], hidden: usize, scale: f32) {
    let mut row = vec![0f32; hidden];
    for (dst, &id) in out.chunks_exact_mut(hidden).zip(ids) {
        let id = id as usize;
        W::load(&table[id * hidden..(id + 1) * hidden], &mut row);
        scale_row(&mut row, scale);
        E::store(&row, dst);
    }
}

/// `row *= scale`; a scale of 1 leaves the row as it is (a plain gather).
fn scale_row(row: &mut [f32], scale: f32) {
    if scale != 1.0 {
        row.iter_mut().for_each(|v| *v *= scale);
    }
}

pub fn rms_norm(ts: &Tensors, op: &RmsNorm) -> Result<()> {
    let weight = to_f32_vec(ts, "weight", &op.weight)?;
    with_float!(op.out.dtype, "rms_norm", E => {
        let x = ts.slice::<E>("x", &op.x)?;
        // SAFETY: out is the op's only output and does not alias x (validated).
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        norm_rows(ts, out, x, weight.len(), |row| normalize(row, &weight, op.eps));
        Ok(())
    })
}

pub fn add_rms_norm(ts: &Tensors, op: &AddRmsNorm) -> Result<()> {
    let weight = to_f32_vec(ts, "weight", &op.weight)?;
    with_float!(op.out.dtype, "add_rms_norm", E => {
        let delta = ts.slice::<E>("delta", &op.delta)?;
        // SAFETY: residual and out are the op's two outputs; validation keeps them apart from each
        // other and from delta.
        let residual = unsafe { ts.slice_mut::<E>("residual", &op.residual)? };
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        add_norm_rows(ts, out, residual, delta, weight.len(), |row| normalize(row, &weight, op.eps));
        Ok(())
    })
}

/// LayerNorm, after `x += delta` where given (the sum stored in x's dtype and normed as stored, as
/// `add_rms_norm` does).
pub fn layer_norm(ts: &Tensors, op: &LayerNorm) -> Result<()> {
    let (weight, bias) = (to_f32_vec(ts, "weight", &op.weight)?, to_f32_vec(ts, "bias", &op.bias)?);
    let norm = |row: &mut [f32]| layer_normalize(row, &weight, &bias, op.eps);
    with_float!(op.out.dtype, "layer_norm", E => {
        // SAFETY: out (and x, where a delta is added to it) are the op's outputs; validation keeps
        // them apart from each other and from the inputs.
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        match op.delta.opt() {
            None => norm_rows(ts, out, ts.slice::<E>("x", &op.x)?, weight.len(), norm),
            Some(delta) => {
                let x = unsafe { ts.slice_mut::<E>("x", &op.x)? };
                add_norm_rows(ts, out, x, ts.slice::<E>("delta", &delta)?, weight.len(), norm);
            }
        }
        Ok(())
    })
}

/// `out[r] = norm(x[r])` for each row of width `h`, in f32, rows shared among the team.
fn norm_rows<E: Float>(ts: &Tensors, out: &mut [E], x: &[E], h: usize, norm: impl Fn(&mut [f32]) + Sync) {
    ts.team.rows(out, h, min_items(h), |r0, out| {
        let mut row = vec![0f32; h];
        for (out, x) in out.chunks_exact_mut(h).zip(x[r0 * h..].chunks_exact(h)) {
            E::load(x, &mut row);
            norm(&mut row);
            E::store(&row, out);
        }
    });
}

/// `x[r] += delta[r]`, then `out[r] = norm(x[r])`: the stream keeps its own dtype, and the norm
/// reads the rounded sum, as the stream itself will be read by the next layer.
fn add_norm_rows<E: Float>(ts: &Tensors, out: &mut [E], x: &mut [E], delta: &[E], h: usize, norm: impl Fn(&mut [f32]) + Sync) {
    ts.team.rows2(out, h, x, h, min_items(h), |r0, out, x| {
        let (mut row, mut d) = (vec![0f32; h], vec![0f32; h]);
        for ((out, x), delta) in out.chunks_exact_mut(h).zip(x.chunks_exact_mut(h)).zip(delta[r0 * h..].chunks_exact(h)) {
            E::load(x, &mut row);
            E::load(delta, &mut d);
            row.iter_mut().zip(&d).for_each(|(r, d)| *r += d);
            E::store(&row, x);
            E::load(x, &mut row);
            norm(&mut row);
            E::store(&row, out);
        }
    });
}

/// `row = (row - mean) / sqrt(mean((row - mean)^2) + eps) * weight + bias`, the sums in f64 (a
/// row's mean subtracted from values far larger than their spread loses nothing to the sums).
fn layer_normalize(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / n;
    let (mean, inv) = (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32);
    row.iter_mut().zip(weight).zip(bias).for_each(|((x, w), b)| *x = (*x - mean) * inv * w + b);
}

/// `row = row / sqrt(mean(row^2) + eps) * weight`.
fn normalize(row: &mut [f32], weight: &[f32], eps: f32) {
    let ms = crate::simd::dot(row, row) / row.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    row.iter_mut().zip(weight).for_each(|(x, w)| *x = *x * inv * w);
}

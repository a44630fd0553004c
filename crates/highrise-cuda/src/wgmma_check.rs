//! wgmma alone, as the Hopper prefill kernels use it, held to a plain matrix product.
//!
//! `wgmma_probe_d{64,128}_{f16,bf16}` (kernels/attention.cu) stages Q (64 x d), K and V (128 x d) the
//! way `flash_attn_wg` does (cp.async into the 128-byte swizzle), runs its two products with its own
//! functions (`wg_qk`: S = Q K^T, both operands K-major in shared memory; `wg_pv`: O = P V, P from
//! registers, V N-major) and writes S and O in f32. The inputs are multiples of 1/8 in [-2, 2], so S
//! is exact in f32; O is held to the product of the device's own S (rounded to the dtype, as the
//! kernel rounds P) and V, so that each product is judged on its own.
//!
//! On the emulated device this checks that the kernels' layouts agree with our model of the ISA
//! (kernels/emu/simt.hpp); on a Hopper GPU, that the model agrees with the hardware. Where it does
//! not, the report says which product, how many elements, which rows and columns, and for a few
//! wrong elements where in the same row the value they hold belongs: a layout or swizzle misread
//! shows as values in the wrong places, a descriptor misread as values from nowhere.

use std::fmt;

use highrise_core::{DType, Error, Result};

use crate::driver::{Driver, Launch, Param, Region};

/// The keys (columns of S, rows of V) the probe's tile has.
const KEYS: usize = 128;
/// The query rows: one warpgroup's.
const ROWS: usize = 64;

/// One product of the probe against the host's.
#[derive(Clone, Debug)]
pub struct Product {
    pub name: &'static str,
    /// Largest |got - want|, and the largest |want| it is measured against.
    pub max_err: f64,
    pub scale: f64,
    pub wrong: usize,
    pub total: usize,
    /// Where the wrong elements are (empty when none is).
    pub detail: String,
}

impl Product {
    pub fn ok(&self) -> bool {
        self.wrong == 0
    }
}

/// Both products of one kernel.
#[derive(Clone, Debug)]
pub struct WgmmaCheck {
    pub kernel: String,
    pub s: Product,
    pub o: Product,
}

impl WgmmaCheck {
    pub fn ok(&self) -> bool {
        self.s.ok() && self.o.ok()
    }
}

impl fmt::Display for WgmmaCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in [&self.s, &self.o] {
            let verdict = if p.ok() { "ok" } else { "WRONG" };
            write!(f, "{} {}: {verdict}, {} of {} elements wrong, max error {:.3e} (scale {:.3e})", self.kernel, p.name, p.wrong, p.total, p.max_err, p.scale)?;
            if !p.detail.is_empty() {
                write!(f, "\n    {}", p.detail.replace('\n', "\n    "))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Deterministic inputs: multiples of 1/8 in [-2, 2].
fn inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 33) % 33) as f32 / 8.0 - 2.0
        })
        .collect()
}

fn round(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(x).to_f64(),
        _ => half::f16::from_f64(x).to_f64(),
    }
}

fn bits(xs: &[f32], dtype: DType) -> Vec<u8> {
    let word = |x: f32| match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_bits(),
        _ => half::f16::from_f32(x).to_bits(),
    };
    xs.iter().flat_map(|&x| word(x).to_le_bytes()).collect()
}

/// `a [m, k] @ b [n, k]^T` (`bt`: b is [k, n]) in f64.
fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, bt: bool) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * if bt { b[p * n + j] } else { b[j * k + p] }).sum();
        }
    }
    out
}

/// Compact a sorted list of indices into ranges: "0-7, 16-23".
fn ranges(mut xs: Vec<usize>) -> String {
    xs.sort_unstable();
    xs.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let mut j = i;
        while j + 1 < xs.len() && xs[j + 1] == xs[j] + 1 {
            j += 1;
        }
        out.push(if i == j { xs[i].to_string() } else { format!("{}-{}", xs[i], xs[j]) });
        i = j + 1;
    }
    out.join(", ")
}

fn compare(name: &'static str, got: &[f32], want: &[f64], cols: usize, tol: f64) -> Product {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let mut max_err = 0f64;
    let mut wrong = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        max_err = max_err.max(if e.is_nan() { f64::INFINITY } else { e });
        if !(e <= tol * scale) {
            wrong.push(i);
        }
    }
    let mut detail = String::new();
    if !wrong.is_empty() {
        let rows = ranges(wrong.iter().map(|i| i / cols).collect());
        let columns = ranges(wrong.iter().map(|i| i % cols).collect());
        detail = format!("wrong rows {rows}; wrong columns {columns}");
        for &i in wrong.iter().take(6) {
            let (r, c) = (i / cols, i % cols);
            let g = got[i] as f64;
            let found: Vec<usize> = (0..cols).filter(|&cc| (want[r * cols + cc] - g).abs() <= tol * scale).collect();
            let at = if found.is_empty() { "not found in this row".to_string() } else { format!("want's value at columns {}", ranges(found)) };
            detail += &format!("\n[{r}][{c}] = {g} (want {}): {at}", want[i]);
        }
    }
    Product { name, max_err, scale, wrong: wrong.len(), total: got.len(), detail }
}

/// Runs `wgmma_probe_d{d}_{dtype}` on `driver` (a Hopper GPU's, or the emulated device's) and
/// compares its S and O with the host's.
pub fn check_wgmma(driver: &dyn Driver, d: usize, dtype: DType) -> Result<WgmmaCheck> {
    let suffix = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => return Err(Error::Unsupported(format!("wgmma_probe: {other}: only f16 and bf16"))),
    };
    if d != 64 && d != 128 {
        return Err(Error::Unsupported(format!("wgmma_probe: head dim {d}: only 64 and 128")));
    }
    let kernel = format!("wgmma_probe_d{d}_{suffix}");
    let (q, k, v) = (inputs(ROWS * d, 1), inputs(KEYS * d, 2), inputs(KEYS * d, 3));
    let f64s = |x: &[f32]| x.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let s_want = matmul(&f64s(&q), &f64s(&k), ROWS, d, KEYS, false);

    let sizes = [("s", ROWS * KEYS * 4), ("o", ROWS * d * 4), ("q", ROWS * d * 2), ("k", KEYS * d * 2), ("v", KEYS * d * 2)];
    let upload = |_: &[u64]| Ok(vec![(2, bits(&q, dtype)), (3, bits(&k, dtype)), (4, bits(&v, dtype))]);
    let args = |ptrs: &[u64]| ptrs.iter().map(|p| p.to_le_bytes().to_vec()).collect();
    let shared_bytes = (1024 + (ROWS + 2 * KEYS) * d * 2) as u32;
    let outs = run_probe(driver, &kernel, &sizes, shared_bytes, upload, args, &[0, 1])?;
    let floats = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect::<Vec<f32>>();
    let (s, o) = (floats(&outs[0]), floats(&outs[1]));
    // O against the S the device computed, so that each product is judged on its own.
    let p: Vec<f64> = s.iter().map(|&x| round(x as f64, dtype)).collect();
    let o_want = matmul(&p, &f64s(&v), ROWS, KEYS, d, true);
    Ok(WgmmaCheck {
        s: compare("S = Q K^T (wg_qk)", &s, &s_want, KEYS, 1e-6),
        o: compare("O = P V (wg_pv)", &o, &o_want, d, 1e-4),
        kernel,
    })
}

/// Runs a probe kernel alone, one block of 128 threads: allocates `buffers` (name, bytes), copies
/// in what `inputs` makes from their addresses ((buffer, bytes) pairs), launches `kernel` with
/// `shared_bytes` and the parameter values `args` makes from the addresses (each one parameter's
/// bytes), reads back the buffers numbered in `outputs`, and frees them all. On a checking driver
/// the buffers are the launch's regions, by name.
pub(crate) fn run_probe(
    driver: &dyn Driver,
    kernel: &str,
    buffers: &[(&str, usize)],
    shared_bytes: u32,
    inputs: impl FnOnce(&[u64]) -> Result<Vec<(usize, Vec<u8>)>>,
    args: impl FnOnce(&[u64]) -> Vec<Vec<u8>>,
    outputs: &[usize],
) -> Result<Vec<Vec<u8>>> {
    driver.bind()?;
    let mut ptrs = Vec::new();
    let run = |ptrs: &mut Vec<u64>| -> Result<Vec<Vec<u8>>> {
        for &(_, bytes) in buffers {
            // SAFETY: a fresh allocation, freed below.
            ptrs.push(unsafe { driver.malloc(bytes)? });
        }
        for (i, bytes) in inputs(ptrs)? {
            if bytes.len() > buffers[i].1 {
                return Err(Error::Invalid(format!("{} bytes for {}'s {} bytes", bytes.len(), buffers[i].0, buffers[i].1)));
            }
            // SAFETY: the copy fits the allocation made for it above (checked).
            unsafe { driver.htod(ptrs[i], &bytes)? };
        }
        if driver.checks() {
            let regions = buffers.iter().zip(ptrs.iter()).map(|(&(name, bytes), &ptr)| Region { name: name.into(), ptr, bytes, tensor: None });
            driver.begin_op(kernel, regions.collect());
        }
        let mut values = args(ptrs);
        let params: Vec<Param> = values.iter_mut().map(|v| v.as_mut_ptr() as Param).collect();
        // SAFETY: the caller's `args` are the kernel's parameters, each pointer one of the
        // allocations above, of the size the kernel reads or writes through it (a checking driver
        // holds the launch to that).
        unsafe { driver.launch(&Launch { kernel, grid: (1, 1, 1), block: (128, 1, 1), shared_bytes, params: &params })? };
        driver.synchronize()?;
        outputs
            .iter()
            .map(|&i| {
                let mut out = vec![0u8; buffers[i].1];
                // SAFETY: the read is the allocation made for it, whole.
                unsafe { driver.dtoh(&mut out, ptrs[i])? };
                Ok(out)
            })
            .collect()
    };
    let result = run(&mut ptrs);
    for p in ptrs {
        // SAFETY: allocated above, not used again.
        unsafe { driver.free(p) };
    }
    result.map_err(|e| Error::Backend(format!("{kernel}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transposed_product_is_reported_with_where_its_values_belong() {
        let want: Vec<f64> = (0..16).map(|i| i as f64).collect();
        let mut got: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        got.swap(1, 2);
        let p = compare("x", &got, &want, 4, 1e-6);
        assert_eq!(p.wrong, 2);
        assert!(p.detail.contains("wrong rows 0; wrong columns 1-2"), "{}", p.detail);
        assert!(p.detail.contains("[0][1] = 2 (want 1): want's value at columns 2"), "{}", p.detail);
        assert!(compare("x", &want.iter().map(|&x| x as f32).collect::<Vec<_>>(), &want, 4, 1e-6).ok());
    }

    #[test]
    fn the_inputs_are_exact_in_both_dtypes() {
        for x in inputs(1000, 7) {
            assert!((-2.0..=2.0).contains(&x) && (x * 8.0).fract() == 0.0);
            assert_eq!(round(x as f64, DType::BF16), x as f64);
            assert_eq!(round(x as f64, DType::F16), x as f64);
        }
    }
}

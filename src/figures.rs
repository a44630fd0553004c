//! Pictures for `highrise inspect`, which a person would rather look at than read: the logit lens as
//! a grid (layers x positions, the top token in each cell, shaded by its probability), attention
//! patterns per head, and the residual stream's norm per layer.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

type Res = Result<(), Box<dyn std::error::Error>>;

/// Registers a sans-serif font for labels, from the usual system locations. Without one the
/// pictures are drawn without text.
pub fn load_font() -> bool {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/Library/Fonts/Arial.ttf",
    ];
    for path in CANDIDATES {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// White to blue as `p` goes from 0 to 1.
fn shade(p: f32) -> RGBColor {
    let p = p.clamp(0.0, 1.0);
    let c = |full: f32| (255.0 - (255.0 - full) * p) as u8;
    RGBColor(c(30.0), c(90.0), c(200.0))
}

/// The logit lens: `cells[layer][position]` = (top token text, probability).
pub fn logit_lens(path: &Path, layers: &[usize], inputs: &[String], cells: &[Vec<(String, f32)>], text: bool) -> Res {
    let (cw, ch, left, top) = (90i32, 22i32, 60i32, 40i32);
    let (w, h) = (left + cw * inputs.len() as i32 + 10, top + ch * layers.len() as i32 + 10);
    let root = BitMapBackend::new(path, (w as u32, h as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let font = ("sans-serif", 12).into_font();
    for (row, (layer, cells)) in layers.iter().zip(cells).enumerate() {
        // Last layer at the top, as the stream rises through the building.
        let y = top + ch * (layers.len() - 1 - row) as i32;
        if text {
            root.draw(&Text::new(format!("L{layer}"), (8, y + 5), font.clone()))?;
        }
        for (col, (tok, p)) in cells.iter().enumerate() {
            let x = left + cw * col as i32;
            root.draw(&Rectangle::new([(x, y), (x + cw - 1, y + ch - 1)], shade(*p).filled()))?;
            if text {
                let label: String = tok.chars().take(10).collect();
                let color = if *p > 0.6 { WHITE } else { BLACK };
                root.draw(&Text::new(label, (x + 3, y + 5), font.clone().color(&color)))?;
            }
        }
    }
    if text {
        for (col, tok) in inputs.iter().enumerate() {
            let label: String = tok.chars().take(10).collect();
            root.draw(&Text::new(label, (left + cw * col as i32 + 3, 12), font.clone()))?;
        }
    }
    root.present()?;
    Ok(())
}

/// Most cells a side of an attention heatmap: past it each cell covers several queries and keys.
const ATTENTION_CELLS: usize = 256;

/// One layer's attention patterns, one heatmap per head: `probs` [heads, T, T]. A long prompt's
/// queries and keys are binned to at most `ATTENTION_CELLS` a side, each cell the largest
/// probability in its bin (a single sharp attention, to a first token say, stays visible).
pub fn attention(path: &Path, layer: usize, probs: &[f32], heads: usize, t: usize, text: bool) -> Res {
    let cells = t.min(ATTENTION_CELLS);
    let cell = (240 / cells.max(1)).clamp(2, 24) as i32;
    let side = cell * cells as i32;
    let cols = heads.min(5) as i32;
    let rows = heads.div_ceil(5) as i32;
    let (w, h) = (cols * (side + 20) + 20, rows * (side + 36) + 20);
    let root = BitMapBackend::new(path, (w as u32, h as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let font = ("sans-serif", 12).into_font();
    for head in 0..heads {
        let (ox, oy) = (20 + (head as i32 % cols) * (side + 20), 30 + (head as i32 / cols) * (side + 36));
        if text {
            root.draw(&Text::new(format!("layer {layer} head {head}"), (ox, oy - 16), font.clone()))?;
        }
        let mut binned = vec![0f32; cells * cells];
        for i in 0..t {
            let row = &probs[(head * t + i) * t..][..t];
            let bin = &mut binned[i * cells / t * cells..][..cells];
            for (j, &p) in row.iter().enumerate() {
                let b = &mut bin[j * cells / t];
                *b = b.max(p);
            }
        }
        for (k, p) in binned.iter().enumerate() {
            let (x, y) = (ox + cell * (k % cells) as i32, oy + cell * (k / cells) as i32);
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], shade(p.sqrt()).filled()))?;
        }
    }
    root.present()?;
    Ok(())
}

/// The residual stream's mean norm per layer (entering each layer, and leaving the last).
pub fn residual_norms(path: &Path, layers: &[usize], norms: &[f32], text: bool) -> Res {
    let root = BitMapBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = norms.iter().cloned().fold(1e-6f32, f32::max) * 1.1;
    let (x0, x1) = (*layers.first().unwrap_or(&0) as f32, *layers.last().unwrap_or(&0) as f32 + 1.0);
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20).x_label_area_size(if text { 30 } else { 0 }).y_label_area_size(if text { 50 } else { 0 });
    if text {
        builder.caption("mean norm of the residual stream entering each layer", ("sans-serif", 16));
    }
    let mut chart = builder.build_cartesian_2d(x0..x1, 0f32..max)?;
    if text {
        chart.configure_mesh().x_desc("layer").y_desc("norm").draw()?;
    }
    chart.draw_series(LineSeries::new(layers.iter().zip(norms).map(|(&l, &n)| (l as f32, n)), &BLUE))?;
    root.present()?;
    Ok(())
}

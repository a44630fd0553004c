//! Bad input at the op boundary: a clear error naming the op and the shapes, nothing written, and the
//! backend usable afterwards.

mod common;

use common::*;
use highrise::core::ops::PagedSeq;
use highrise::core::{DType, Error, Tensor};

fn msg<T: std::fmt::Debug>(r: highrise::Result<T>) -> (Error, String) {
    let e = r.expect_err("the call should fail");
    let m = e.to_string();
    (e, m)
}

#[test]
fn shape_mismatch_names_op_and_shapes() {
    let x = Tensor::full(&cpu(), DType::F32, &[3, 8], 1.0).unwrap();
    let w = Tensor::full(&cpu(), DType::F32, &[16, 4], 1.0).unwrap();
    let mut out = poisoned(DType::F32, &[3, 16]);
    let (e, m) = msg(cpu().linear(&mut out, &x, &w, None));
    assert!(matches!(e, Error::Invalid(_)), "{m}");
    assert!(m.starts_with("linear:") && m.contains("[3, 8]") && m.contains("[16, 4]"), "{m}");
    // Nothing was written.
    assert!(out.to_f32().unwrap().iter().all(|v| v.is_nan()));
}

#[test]
fn mixed_activation_dtypes_are_refused() {
    let x = Tensor::full(&cpu(), DType::F16, &[2, 4], 1.0).unwrap();
    let w = Tensor::full(&cpu(), DType::F32, &[4], 1.0).unwrap();
    let mut out = poisoned(DType::F32, &[2, 4]);
    let (_, m) = msg(cpu().rms_norm(&mut out, &x, &w, 1e-5));
    assert!(m.contains("rms_norm") && m.contains("f16") && m.contains("f32"), "{m}");
}

#[test]
fn token_id_outside_vocabulary_is_named() {
    let table = Tensor::full(&cpu(), DType::F32, &[10, 4], 1.0).unwrap();
    let mut out = poisoned(DType::F32, &[2, 4]);
    let (_, m) = msg(cpu().embedding(&mut out, &table, &[3, 10]));
    assert!(m.contains("embedding") && m.contains("token id 10") && m.contains("vocabulary of 10"), "{m}");
}

#[test]
fn quantized_activations_are_declined_with_op_and_dtype() {
    let x = Tensor::full(&cpu(), DType::F32, &[1, 32], 1.0).unwrap();
    let w = Tensor::full(&cpu(), DType::F32, &[32], 1.0).unwrap();
    let mut out = Tensor::from_bytes(&cpu(), DType::Q8_0, &[1, 32], &[0u8; 34]).unwrap();
    let (e, m) = msg(cpu().rms_norm(&mut out, &x, &w, 1e-5));
    assert!(matches!(e, Error::Unsupported(_)), "{m}");
    assert!(m.contains("rms_norm") && m.contains("q8_0") && m.contains("cpu"), "{m}");
}

#[test]
fn block_table_out_of_range_is_refused() {
    let (hq, hkv, d, bs) = (2, 1, 64, 16);
    let k = Tensor::full(&cpu(), DType::F32, &[2, hkv, bs, d], 0.5).unwrap();
    let v = Tensor::full(&cpu(), DType::F32, &[2, hkv, bs, d], 0.5).unwrap();
    let q = Tensor::full(&cpu(), DType::F32, &[1, hq, d], 0.5).unwrap();
    let mut out = poisoned(DType::F32, &[1, hq, d]);
    let seqs = [PagedSeq { q_len: 1, context_len: 20, blocks_start: 0 }];
    let (_, m) = msg(cpu().paged_attention(&mut out, &q, &k, &v, &seqs, &[0, 7], 0.125));
    assert!(m.contains("paged_attention") && m.contains("block 7"), "{m}");
    let (_, m) = msg(cpu().paged_attention(&mut out, &q, &k, &v, &seqs, &[0], 0.125));
    assert!(m.contains("needs blocks 0..2"), "{m}");
}

#[test]
fn handle_from_another_backend_instance_is_refused() {
    let other = highrise::core::plugin::Plugin::open(&highrise::core::plugin::find_backend("cpu").unwrap())
        .unwrap()
        .create()
        .unwrap();
    let x = Tensor::full(&other, DType::F32, &[2, 4], 1.0).unwrap();
    let w = Tensor::full(&cpu(), DType::F32, &[4], 1.0).unwrap();
    let mut out = poisoned(DType::F32, &[2, 4]);
    let (_, m) = msg(cpu().rms_norm(&mut out, &x, &w, 1e-5));
    assert!(m.contains("x:") && m.contains("does not belong"), "{m}");
}

#[test]
fn tensor_larger_than_its_allocation_is_refused() {
    // A raw reference claiming more elements than were allocated must not be read past the end.
    use highrise::core::ops::{GluAct, Op, SwiGlu};
    use highrise::core::{Shape, TensorRef};
    let small = Tensor::full(&cpu(), DType::F32, &[1, 4], 1.0).unwrap();
    let mut out = poisoned(DType::F32, &[1, 64]);
    let lie = TensorRef::from_raw(small.as_ref().handle, DType::F32, Shape::new(&[1, 64]).unwrap());
    let op = Op::SwiGlu(SwiGlu { out: out.as_mut(), gate: lie, up: lie, act: GluAct::Silu });
    let (_, m) = msg(cpu().run(&op));
    assert!(m.contains("gate") && m.contains("needs 256 bytes"), "{m}");
}

#[test]
fn output_aliasing_an_input_is_refused() {
    use highrise::core::ops::{GluAct, Op, SwiGlu};
    let mut a = Tensor::full(&cpu(), DType::F32, &[1, 8], 1.0).unwrap();
    let b = Tensor::full(&cpu(), DType::F32, &[1, 8], 1.0).unwrap();
    let r = a.as_mut();
    let op = Op::SwiGlu(SwiGlu { out: r, gate: r, up: b.as_ref(), act: GluAct::Silu });
    let (_, m) = msg(cpu().run(&op));
    assert!(m.contains("swiglu") && m.contains("output out is the same memory as gate"), "{m}");
}

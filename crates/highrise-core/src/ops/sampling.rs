//! Choosing tokens from the logits on the backend, so a decoding step reads back a token id and its
//! log-probability per sequence instead of a whole row of the vocabulary.

use super::{Check, CheckResult};
use crate::{DType, TensorRef};

/// Greedy choice: `index[b] = argmax_v x[b, v]` (the lowest index among equal maxima) and
/// `logprob[b] = x[b, index[b]] - logsumexp_v x[b, v]`. x [B, V] float; index [B] u32; logprob [B] f32.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Argmax<'a> {
    pub index: TensorRef<'a>,
    pub logprob: TensorRef<'a>,
    pub x: TensorRef<'a>,
}

impl Argmax<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.present("x", &self.x)?;
        c.float("x", &self.x)?;
        c.rank("x", &self.x, 2)?;
        let rows = self.x.dims()[0];
        if self.x.dims()[1] == 0 {
            return Err("x has no columns to choose from".into());
        }
        c.present("index", &self.index)?;
        if self.index.dtype != DType::U32 {
            return Err(format!("index must be u32, is {}", self.index.dtype));
        }
        c.dims("index", &self.index, &[rows])?;
        c.present("logprob", &self.logprob)?;
        if self.logprob.dtype != DType::F32 {
            return Err(format!("logprob must be f32, is {}", self.logprob.dtype));
        }
        c.dims("logprob", &self.logprob, &[rows])
    }
}

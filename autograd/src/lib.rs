//! Reverse-mode automatic differentiation over engine tensors: `Var`, the tape, backward rules,
//! `no_grad`, gradient checkpointing, gradcheck, and the optimizers (AdamW). It holds no model code
//! and no kernels; the engine computes, this crate records and differentiates. (Arrives with the
//! autograd issue; the crate exists now so that the dependency order of the workspace is fixed.)

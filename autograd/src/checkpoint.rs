//! Gradient checkpointing: run a block's forward without recording (so none of its activations are
//! kept), and run it again with recording during the backward to get its gradients.

use std::sync::{Arc, Mutex};

use engine::{Result, Tensor};

use crate::var::{backward_many, enable_grad, is_grad_enabled, no_grad, BackwardFn};
use crate::Var;

/// Runs `f(inputs)` under `no_grad`, keeping only the inputs, and returns its outputs as vars whose
/// backward reruns `f` with recording on and backpropagates through that second run. Parameters
/// that `f` captures receive their gradients directly from the rerun. `f` must be deterministic
/// (dropout takes explicit seeds, so it is).
///
/// Inside `no_grad` this is a plain call.
pub fn checkpoint<F>(inputs: &[Var], f: F) -> Result<Vec<Var>>
where
    F: Fn(&[Var]) -> Result<Vec<Var>> + Send + Sync + 'static,
{
    if !is_grad_enabled() {
        return f(inputs);
    }
    let detached: Vec<Var> = inputs.iter().map(|v| v.detach()).collect();
    let outputs: Vec<Tensor> = no_grad(|| f(&detached))?.into_iter().map(|v| v.value().clone()).collect();
    drop(detached);

    // The output gradients arrive one by one (one node per output); they are collected here and
    // used when the shared recompute node runs, which the graph order puts after all outputs.
    let collected: Arc<Mutex<Vec<Option<Tensor>>>> = Arc::new(Mutex::new(vec![None; outputs.len()]));
    let saved: Vec<Tensor> = inputs.iter().map(|v| v.value().clone()).collect();
    let input_requires: Vec<bool> = inputs.iter().map(|v| v.requires_grad()).collect();
    let shapes: Vec<Vec<usize>> = outputs.iter().map(|t| t.shape().to_vec()).collect();
    let grads_in = collected.clone();
    let saved_outputs = outputs.len();
    let recompute: BackwardFn = Box::new(move |_g: &Tensor, needs: &[bool]| {
        let fresh = vec![None; saved_outputs];
        let grads: Vec<Option<Tensor>> = std::mem::replace(&mut *grads_in.lock().unwrap_or_else(|e| e.into_inner()), fresh);
        let leaves: Vec<Var> = saved.iter().zip(&input_requires).map(|(t, &r)| Var::leaf(t.clone(), r)).collect();
        let outs = enable_grad(|| f(&leaves))?;
        let roots: Vec<(Var, Tensor)> = outs.into_iter().zip(grads).filter_map(|(o, g)| Some((o.clone(), g?)).filter(|_| o.requires_grad())).collect();
        if !roots.is_empty() {
            backward_many(&roots, false)?;
        }
        Ok(leaves.iter().zip(needs).map(|(l, &n)| if n { l.grad() } else { None }).collect())
    });
    let parents: Vec<&Var> = inputs.iter().collect();
    // The hub carries no value (an empty tensor) and links the inputs to every output.
    let device = inputs.first().map(|v| v.device()).unwrap_or(engine::Device::Cpu);
    let hub = Var::from_op_always("checkpoint", Tensor::zeros(&[0], engine::DType::F32, device)?, &parents, recompute);
    let mut result = Vec::with_capacity(outputs.len());
    for (i, (out, shape)) in outputs.into_iter().zip(shapes).enumerate() {
        let slot = collected.clone();
        let stash: BackwardFn = Box::new(move |g: &Tensor, _| {
            let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
            s[i] = Some(match s[i].take() {
                Some(old) => old.add(g)?,
                None => g.clone(),
            });
            debug_assert_eq!(g.shape(), shape.as_slice());
            Ok(vec![Some(Tensor::zeros(&[0], engine::DType::F32, g.device())?)])
        });
        result.push(Var::from_op_always("checkpoint_output", out, &[&hub], stash));
    }
    Ok(result)
}

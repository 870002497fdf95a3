//! `Var`, the recorded graph, grad mode and the backward pass.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use engine::{DType, Device, Error, Result, Tensor};

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread record the graph (false inside `no_grad`).
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Restores the previous grad mode when dropped (also on panic or early return).
struct GradMode(bool);
impl GradMode {
    fn set(enabled: bool) -> GradMode {
        GradMode(GRAD_ENABLED.with(|g| g.replace(enabled)))
    }
}
impl Drop for GradMode {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

/// Runs `f` without recording: results are constants and no tensor is saved for a backward.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _mode = GradMode::set(false);
    f()
}

/// Runs `f` with recording on (e.g. a recomputation inside a backward).
pub fn enable_grad<R>(f: impl FnOnce() -> R) -> R {
    let _mode = GradMode::set(true);
    f()
}

/// A backward rule: given the gradient of the op's output and which of its inputs need a gradient,
/// returns one entry per input (None where not needed or where the gradient is zero).
pub type BackwardFn = Box<dyn Fn(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

struct Node {
    op: &'static str,
    parents: Vec<Var>,
    backward: BackwardFn,
}

struct Inner {
    id: usize,
    value: Tensor,
    requires_grad: bool,
    /// Created by `leaf` / `constant` (or an op that recorded nothing): gradients stop here.
    leaf: bool,
    op: &'static str,
    grad: Mutex<Option<Tensor>>,
    /// The recorded op; None for leaves and after a backward freed it.
    node: Mutex<Option<Arc<Node>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Inner {
    /// Tears a long chain down iteratively: dropping the last handle of a deep graph recursively
    /// would overflow the stack.
    fn drop(&mut self) {
        let Some(node) = self.node.get_mut().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let mut stack = vec![node];
        while let Some(node) = stack.pop() {
            if let Ok(node) = Arc::try_unwrap(node) {
                for p in node.parents {
                    if let Ok(mut inner) = Arc::try_unwrap(p.0) {
                        if let Some(n) = inner.node.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
                            stack.push(n);
                        }
                    }
                }
            }
        }
    }
}

/// A tensor in the autograd graph. Cloning is cheap (shared).
#[derive(Clone)]
pub struct Var(Arc<Inner>);

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var[{:?}, {}, {}{}]", self.shape(), self.dtype(), self.op(), if self.requires_grad() { ", requires_grad" } else { "" })
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl Var {
    fn make(value: Tensor, requires_grad: bool, leaf: bool, op: &'static str, node: Option<Node>) -> Var {
        Var(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            value,
            requires_grad,
            leaf,
            op,
            grad: Mutex::new(None),
            node: Mutex::new(node.map(Arc::new)),
        }))
    }

    /// A leaf: a parameter (requires_grad = true) or a frozen weight / input (false; it never
    /// allocates a gradient).
    pub fn leaf(value: Tensor, requires_grad: bool) -> Var {
        Var::make(value, requires_grad, true, "leaf", None)
    }

    /// A value no gradient is asked of.
    pub fn constant(value: Tensor) -> Var {
        Var::make(value, false, true, "constant", None)
    }

    /// The result of op `op` on `parents`. It records a node with `backward` only when grad mode is
    /// on and some parent requires a gradient; otherwise `backward` (and what it saved) is dropped
    /// at once and the result is a constant.
    pub fn from_op(op: &'static str, value: Tensor, parents: &[&Var], backward: impl Fn(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static) -> Var {
        if !is_grad_enabled() || !parents.iter().any(|p| p.requires_grad()) {
            return Var::make(value, false, true, op, None);
        }
        let node = Node { op, parents: parents.iter().map(|&p| p.clone()).collect(), backward: Box::new(backward) };
        Var::make(value, true, false, op, Some(node))
    }

    /// Like `from_op` but always records when grad mode is on, even if no parent requires a
    /// gradient (used by checkpointing, whose closure may hold parameters that do).
    pub(crate) fn from_op_always(op: &'static str, value: Tensor, parents: &[&Var], backward: BackwardFn) -> Var {
        if !is_grad_enabled() {
            return Var::make(value, false, true, op, None);
        }
        let node = Node { op, parents: parents.iter().map(|&p| p.clone()).collect(), backward };
        Var::make(value, true, false, op, Some(node))
    }

    /// The result of an op that has no backward rule: a gradient reaching it is an error naming
    /// the op (gradients are never dropped silently).
    pub fn without_backward(op: &'static str, value: Tensor, parents: &[&Var]) -> Var {
        Var::from_op(op, value, parents, move |_, _| Err(Error::msg(format!("{op} has no backward rule: a gradient cannot flow through it"))))
    }

    pub fn value(&self) -> &Tensor {
        &self.0.value
    }
    pub fn shape(&self) -> &[usize] {
        self.0.value.shape()
    }
    pub fn rank(&self) -> usize {
        self.0.value.rank()
    }
    pub fn dim(&self, d: isize) -> Result<usize> {
        self.0.value.dim(d)
    }
    pub fn elem_count(&self) -> usize {
        self.0.value.elem_count()
    }
    pub fn dtype(&self) -> DType {
        self.0.value.dtype()
    }
    pub fn device(&self) -> Device {
        self.0.value.device()
    }
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }
    pub fn is_leaf(&self) -> bool {
        self.0.leaf
    }
    /// Name of the op that produced this value ("leaf" / "constant" for leaves).
    pub fn op(&self) -> &'static str {
        self.0.op
    }
    pub fn id(&self) -> usize {
        self.0.id
    }
    /// True when both handles are the same graph node.
    pub fn same(&self, other: &Var) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The same value as a constant, cut off from the graph.
    pub fn detach(&self) -> Var {
        Var::constant(self.0.value.clone())
    }

    /// The accumulated gradient of a leaf that requires one (None before any backward reached it).
    pub fn grad(&self) -> Option<Tensor> {
        lock(&self.0.grad).clone()
    }
    /// Forgets the accumulated gradient.
    pub fn zero_grad(&self) {
        *lock(&self.0.grad) = None;
    }
    /// Replaces the accumulated gradient (e.g. after clipping); `None` clears it.
    pub fn set_grad(&self, g: Option<Tensor>) -> Result<()> {
        if let Some(g) = &g {
            if g.shape() != self.shape() {
                return Err(Error::ShapeMismatch { op: "set_grad", lhs: g.shape().to_vec(), rhs: self.shape().to_vec() });
            }
        }
        *lock(&self.0.grad) = g;
        Ok(())
    }

    /// Backward from this scalar (one-element) output with gradient 1; frees the graph.
    pub fn backward(&self) -> Result<()> {
        if self.elem_count() != 1 {
            return Err(Error::BadShape { op: "backward", msg: "backward() needs a one-element output; use backward_with(grad)".into(), shape: self.shape().to_vec() });
        }
        let one = Tensor::ones(self.shape(), self.dtype(), self.device())?;
        backward_many(&[(self.clone(), one)], false)
    }

    /// Backward from this output with the given output gradient; `retain_graph` keeps the graph
    /// (and its saved tensors) for another backward.
    pub fn backward_with(&self, grad: &Tensor, retain_graph: bool) -> Result<()> {
        backward_many(&[(self.clone(), grad.clone())], retain_graph)
    }
}

/// Adds `g` to the gradient slot of `id`.
fn accumulate(map: &mut HashMap<usize, Tensor>, id: usize, g: Tensor) -> Result<()> {
    match map.remove(&id) {
        Some(old) => {
            map.insert(id, old.add(&g)?);
        }
        None => {
            map.insert(id, g);
        }
    }
    Ok(())
}

/// Backward from several outputs at once, each with its output gradient. Gradients accumulate into
/// the leaves that require them; every node passed is freed unless `retain_graph`.
pub fn backward_many(roots: &[(Var, Tensor)], retain_graph: bool) -> Result<()> {
    for (r, g) in roots {
        if !r.requires_grad() {
            return Err(Error::msg(format!("backward: the output ({:?}) does not require a gradient (no parameter reaches it, or it was computed under no_grad)", r)));
        }
        if g.shape() != r.shape() {
            return Err(Error::ShapeMismatch { op: "backward (output gradient vs output)", lhs: g.shape().to_vec(), rhs: r.shape().to_vec() });
        }
    }
    // Topological order (parents before children) by an iterative depth-first search over the
    // vars that require a gradient.
    let mut order: Vec<Var> = Vec::new();
    let mut seen: HashSet<usize> = HashSet::new();
    // A var is marked when it is expanded (not when pushed), so that it is emitted only after
    // every var it depends on, whichever path reaches it first.
    for (root, _) in roots {
        let mut stack: Vec<(Var, bool)> = vec![(root.clone(), false)];
        while let Some((v, expanded)) = stack.pop() {
            if expanded {
                order.push(v);
                continue;
            }
            if !seen.insert(v.id()) {
                continue;
            }
            let parents: Vec<Var> = lock(&v.0.node).as_ref().map(|n| n.parents.clone()).unwrap_or_default();
            stack.push((v, true));
            for p in parents {
                if p.requires_grad() && !seen.contains(&p.id()) {
                    stack.push((p, false));
                }
            }
        }
    }
    let mut grads: HashMap<usize, Tensor> = HashMap::new();
    for (r, g) in roots {
        accumulate(&mut grads, r.id(), g.to_dtype(r.dtype())?)?;
    }
    // Popping drops each var's handle as soon as it is done, so values die during the pass.
    while let Some(v) = order.pop() {
        // In reverse topological order every consumer of `v` ran already: its gradient is complete.
        let Some(g) = grads.remove(&v.id()) else { continue };
        if v.is_leaf() {
            let mut slot = lock(&v.0.grad);
            *slot = Some(match slot.take() {
                Some(old) => old.add(&g)?,
                None => g.contiguous()?,
            });
            continue;
        }
        let node = {
            let mut slot = lock(&v.0.node);
            if retain_graph { slot.clone() } else { slot.take() }
        };
        let Some(node) = node else {
            return Err(Error::msg(format!("backward through {} a second time: its graph was freed by the first backward (pass retain_graph)", v.op())));
        };
        let needs: Vec<bool> = node.parents.iter().map(|p| p.requires_grad()).collect();
        let input_grads = (node.backward)(&g, &needs).map_err(|e| Error::msg(format!("backward of {}: {e}", node.op)))?;
        if input_grads.len() != node.parents.len() {
            return Err(Error::msg(format!("backward of {}: {} gradients for {} inputs", node.op, input_grads.len(), node.parents.len())));
        }
        for ((p, gi), need) in node.parents.iter().zip(input_grads).zip(needs) {
            let (Some(gi), true) = (gi, need) else { continue };
            if gi.shape() != p.shape() {
                return Err(Error::msg(format!("backward of {}: gradient of shape {:?} for an input of shape {:?}", node.op, gi.shape(), p.shape())));
            }
            accumulate(&mut grads, p.id(), gi.to_dtype(p.dtype())?)?;
        }
    }
    Ok(())
}

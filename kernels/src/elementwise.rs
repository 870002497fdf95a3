//! Element-wise math: unary maps, binary maps, comparisons. The op enums are shared by the CPU
//! backend (the `apply` functions) and the CUDA kernels (the `cuda_name` functions select the device
//! function of the same math in cuda/elementwise.cu).

use crate::compile::KernelSource;

/// kernels/cuda/elementwise.cu. No fast-math: the unary maps must match the CPU's libm closely.
pub const SOURCE: KernelSource = KernelSource { name: "elementwise", code: include_str!("../cuda/elementwise.cu"), options: &[] };

/// Threads per block of every element-wise kernel (EW_BLOCK in the .cu).
pub const BLOCK: u32 = 256;
/// Elements per pack (per thread) of a contiguous kernel whose operands have these element sizes:
/// one 16-byte access of the widest (VEC1/VEC2 in the .cu).
pub fn pack_elems(elem_sizes: &[usize]) -> usize {
    16 / elem_sizes.iter().copied().max().unwrap_or(16)
}

/// Byte alignment the contiguous kernels need of an operand of `elem_size` bytes when packs hold
/// `pack` elements (the `Pack` alignment in common.cuh).
pub fn pack_align(elem_size: usize, pack: usize) -> usize {
    (elem_size * pack).min(16)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Neg,
    Abs,
    Sqr,
    Sqrt,
    Rsqrt,
    Recip,
    Exp,
    Log,
    Sin,
    Cos,
    Tanh,
    Sigmoid,
    Silu,
    Relu,
    /// GELU with the exact erf form (PyTorch's default).
    Gelu,
    /// GELU with the tanh approximation (PyTorch's `approximate="tanh"`).
    GeluTanh,
    /// x * mul + add.
    Affine { mul: f32, add: f32 },
    /// x raised to a constant power.
    Powf(f32),
    Clamp { min: f32, max: f32 },
    /// max(x, 0) + slope * min(x, 0).
    LeakyRelu(f32),
}

impl UnaryOp {
    /// (op code, p0, p1) for `unary_*` in cuda/elementwise.cu (the `switch` in `unary_math`).
    pub fn cuda_code(self) -> (i32, f32, f32) {
        match self {
            UnaryOp::Neg => (0, 0.0, 0.0),
            UnaryOp::Abs => (1, 0.0, 0.0),
            UnaryOp::Sqr => (2, 0.0, 0.0),
            UnaryOp::Sqrt => (3, 0.0, 0.0),
            UnaryOp::Rsqrt => (4, 0.0, 0.0),
            UnaryOp::Recip => (5, 0.0, 0.0),
            UnaryOp::Exp => (6, 0.0, 0.0),
            UnaryOp::Log => (7, 0.0, 0.0),
            UnaryOp::Sin => (8, 0.0, 0.0),
            UnaryOp::Cos => (9, 0.0, 0.0),
            UnaryOp::Tanh => (10, 0.0, 0.0),
            UnaryOp::Sigmoid => (11, 0.0, 0.0),
            UnaryOp::Silu => (12, 0.0, 0.0),
            UnaryOp::Relu => (13, 0.0, 0.0),
            UnaryOp::Gelu => (14, 0.0, 0.0),
            UnaryOp::GeluTanh => (15, 0.0, 0.0),
            UnaryOp::Affine { mul, add } => (16, mul, add),
            UnaryOp::Powf(p) => (17, p, 0.0),
            UnaryOp::Clamp { min, max } => (18, min, max),
            UnaryOp::LeakyRelu(s) => (19, s, 0.0),
        }
    }

    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sqr => x * x,
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => sigmoid(x),
            UnaryOp::Silu => x * sigmoid(x),
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Gelu => gelu_erf(x),
            UnaryOp::GeluTanh => gelu_tanh(x),
            UnaryOp::Affine { mul, add } => x * mul + add,
            UnaryOp::Powf(p) => x.powf(p),
            UnaryOp::Clamp { min, max } => x.max(min).min(max),
            UnaryOp::LeakyRelu(s) => {
                if x >= 0.0 {
                    x
                } else {
                    s * x
                }
            }
        }
    }
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

impl BinaryOp {
    /// Op code for `binary_*` in cuda/elementwise.cu.
    pub fn cuda_code(self) -> i32 {
        match self {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
            BinaryOp::Max => 4,
            BinaryOp::Min => 5,
            BinaryOp::Pow => 6,
        }
    }

    #[inline(always)]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
            BinaryOp::Pow => a.powf(b),
        }
    }
}

/// Comparisons give a u8 mask (1 where true).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// Op code for `cmp_*` in cuda/elementwise.cu.
    pub fn cuda_code(self) -> i32 {
        match self {
            CmpOp::Eq => 0,
            CmpOp::Ne => 1,
            CmpOp::Lt => 2,
            CmpOp::Le => 3,
            CmpOp::Gt => 4,
            CmpOp::Ge => 5,
        }
    }

    #[inline(always)]
    pub fn apply(self, a: f32, b: f32) -> bool {
        match self {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
        }
    }
}

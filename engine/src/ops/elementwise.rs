//! Element-wise ops: copies and casts, unary maps, broadcasting binary maps, comparisons, where.

use kernels::elementwise::{BinaryOp, CmpOp, UnaryOp};

use crate::cpu::{elementwise as cpu, CpuStorage};
use crate::layout::broadcast_shape;
use crate::storage::Storage;
use crate::{cpu_dispatch, float_dispatch, DType, Device, Error, Result, Tensor};

impl Tensor {
    /// A row-major copy into new storage.
    pub fn copy(&self) -> Result<Tensor> {
        let storage = match &*self.read_storage() {
            Storage::Cpu(s) => Storage::Cpu(cpu_dispatch!(s, |d: T| CpuStorage::from_vec(cpu::copy_strided::<T>(d, self.layout())))),
            Storage::Cuda(s) => Storage::Cuda(s.copy_strided(self.layout())?),
        };
        Tensor::from_storage(storage, self.shape())
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = match &*self.read_storage() {
            Storage::Cpu(s) => Storage::Cpu(cpu_dispatch!(s, |d: A| match dtype {
                DType::F32 => CpuStorage::from_vec(cpu::cast::<A, f32>(d, self.layout())),
                DType::BF16 => CpuStorage::from_vec(cpu::cast::<A, half::bf16>(d, self.layout())),
                DType::F16 => CpuStorage::from_vec(cpu::cast::<A, half::f16>(d, self.layout())),
                DType::I64 => CpuStorage::from_vec(cpu::cast::<A, i64>(d, self.layout())),
                DType::U8 => CpuStorage::from_vec(cpu::cast::<A, u8>(d, self.layout())),
            })),
            Storage::Cuda(s) => Storage::Cuda(s.cast(self.layout(), dtype)?),
        };
        Tensor::from_storage(storage, self.shape())
    }

    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        self.float_only("unary")?;
        let storage = match &*self.read_storage() {
            Storage::Cpu(s) if s.dtype() == DType::F32 => Storage::Cpu(cpu::unary_f32(s.as_slice()?, self.layout(), op)),
            Storage::Cpu(s) => Storage::Cpu(float_dispatch!(s, "unary", |d: T| CpuStorage::from_vec(cpu::unary_map::<T>(d, self.layout(), |x| op.apply(x))))),
            Storage::Cuda(s) => Storage::Cuda(s.unary(self.layout(), op)?),
        };
        Tensor::from_storage(storage, self.shape())
    }

    pub fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        self.same_device(rhs, "binary")?;
        self.same_dtype(rhs, "binary")?;
        self.float_only("binary")?;
        let shape = broadcast_shape("binary", self.shape(), rhs.shape())?;
        let (la, lb) = (self.layout().broadcast_to(&shape)?, rhs.layout().broadcast_to(&shape)?);
        let storage = match (&*self.read_storage(), &*rhs.read_storage()) {
            (Storage::Cpu(a), Storage::Cpu(b)) => Storage::Cpu(match a.dtype() {
                DType::F32 => cpu::binary_f32(a.as_slice()?, &la, b.as_slice()?, &lb, op),
                DType::BF16 => CpuStorage::from_vec(cpu::binary_map::<half::bf16, half::bf16>(a.as_slice()?, &la, b.as_slice()?, &lb, |x, y| half::bf16::from_f32(op.apply(x, y)))),
                DType::F16 => CpuStorage::from_vec(cpu::binary_map::<half::f16, half::f16>(a.as_slice()?, &la, b.as_slice()?, &lb, |x, y| half::f16::from_f32(op.apply(x, y)))),
                dt => return Err(Error::UnsupportedDType { op: "binary", dtype: dt }),
            }),
            (Storage::Cuda(a), Storage::Cuda(b)) => Storage::Cuda(a.binary(&la, b, &lb, op)?),
            _ => unreachable!("devices checked above"),
        };
        Tensor::from_storage(storage, &shape)
    }

    /// Element-wise comparison with broadcasting; a u8 mask (1 where true).
    pub fn cmp(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor> {
        self.same_device(rhs, "cmp")?;
        self.same_dtype(rhs, "cmp")?;
        let shape = broadcast_shape("cmp", self.shape(), rhs.shape())?;
        let (la, lb) = (self.layout().broadcast_to(&shape)?, rhs.layout().broadcast_to(&shape)?);
        let storage = match (&*self.read_storage(), &*rhs.read_storage()) {
            (Storage::Cpu(a), Storage::Cpu(b)) => Storage::Cpu(cpu_dispatch!(a, |x: T| {
                let y = b.as_slice::<T>()?;
                CpuStorage::from_vec(cpu::binary_map::<T, u8>(x, &la, y, &lb, |p, q| op.apply(p, q) as u8))
            })),
            (Storage::Cuda(a), Storage::Cuda(b)) => Storage::Cuda(a.cmp(&la, b, &lb, op)?),
            _ => unreachable!("devices checked above"),
        };
        Tensor::from_storage(storage, &shape)
    }

    /// mask ? on_true : on_false, broadcasting all three; the mask is u8 (non-zero = true).
    pub fn where_cond(mask: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        if mask.dtype() != DType::U8 {
            return Err(Error::DTypeMismatch { op: "where_cond (mask)", lhs: mask.dtype(), rhs: DType::U8 });
        }
        let m = mask.to_dtype(on_true.dtype())?;
        // m * t + (1 - m) * f would turn inf/nan in the unused branch into nan; select explicitly.
        let shape = broadcast_shape("where_cond", &broadcast_shape("where_cond", m.shape(), on_true.shape())?, on_false.shape())?;
        let (m, t, f) = (m.broadcast_to(&shape)?, on_true.broadcast_to(&shape)?, on_false.broadcast_to(&shape)?);
        m.same_device(&t, "where_cond")?;
        m.same_device(&f, "where_cond")?;
        t.same_dtype(&f, "where_cond")?;
        if m.device() == Device::Cpu {
            let (mv, tv, fv) = (m.to_vec_f32()?, t.to_vec_f32()?, f.to_vec_f32()?);
            let out: Vec<f32> = mv.iter().zip(tv.iter().zip(&fv)).map(|(&c, (&a, &b))| if c != 0.0 { a } else { b }).collect();
            return Tensor::from_f32_vec(out, &shape, on_true.dtype());
        }
        let storage = match (&*m.read_storage(), &*t.read_storage(), &*f.read_storage()) {
            (Storage::Cuda(ms), Storage::Cuda(ts), Storage::Cuda(fs)) => Storage::Cuda(ms.where_cond(m.layout(), ts, t.layout(), fs, f.layout())?),
            _ => return Err(Error::msg("where_cond: all three tensors must be on the same device")),
        };
        Tensor::from_storage(storage, &shape)
    }

    // ---- named unary ops --------------------------------------------------------------------
    pub fn neg(&self) -> Result<Tensor> { self.unary(UnaryOp::Neg) }
    pub fn abs(&self) -> Result<Tensor> { self.unary(UnaryOp::Abs) }
    pub fn sqr(&self) -> Result<Tensor> { self.unary(UnaryOp::Sqr) }
    pub fn sqrt(&self) -> Result<Tensor> { self.unary(UnaryOp::Sqrt) }
    pub fn rsqrt(&self) -> Result<Tensor> { self.unary(UnaryOp::Rsqrt) }
    pub fn recip(&self) -> Result<Tensor> { self.unary(UnaryOp::Recip) }
    pub fn exp(&self) -> Result<Tensor> { self.unary(UnaryOp::Exp) }
    pub fn log(&self) -> Result<Tensor> { self.unary(UnaryOp::Log) }
    pub fn sin(&self) -> Result<Tensor> { self.unary(UnaryOp::Sin) }
    pub fn cos(&self) -> Result<Tensor> { self.unary(UnaryOp::Cos) }
    pub fn tanh(&self) -> Result<Tensor> { self.unary(UnaryOp::Tanh) }
    pub fn sigmoid(&self) -> Result<Tensor> { self.unary(UnaryOp::Sigmoid) }
    pub fn silu(&self) -> Result<Tensor> { self.unary(UnaryOp::Silu) }
    pub fn relu(&self) -> Result<Tensor> { self.unary(UnaryOp::Relu) }
    pub fn gelu(&self) -> Result<Tensor> { self.unary(UnaryOp::Gelu) }
    pub fn gelu_tanh(&self) -> Result<Tensor> { self.unary(UnaryOp::GeluTanh) }
    pub fn leaky_relu(&self, slope: f32) -> Result<Tensor> { self.unary(UnaryOp::LeakyRelu(slope)) }
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> { self.unary(UnaryOp::Affine { mul, add }) }
    pub fn mul_scalar(&self, v: f32) -> Result<Tensor> { self.affine(v, 0.0) }
    pub fn add_scalar(&self, v: f32) -> Result<Tensor> { self.affine(1.0, v) }
    pub fn powf(&self, p: f32) -> Result<Tensor> { self.unary(UnaryOp::Powf(p)) }
    pub fn clamp(&self, min: f32, max: f32) -> Result<Tensor> { self.unary(UnaryOp::Clamp { min, max }) }

    // ---- named binary ops -------------------------------------------------------------------
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> { self.binary(rhs, BinaryOp::Add) }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> { self.binary(rhs, BinaryOp::Sub) }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> { self.binary(rhs, BinaryOp::Mul) }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> { self.binary(rhs, BinaryOp::Div) }
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> { self.binary(rhs, BinaryOp::Max) }
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> { self.binary(rhs, BinaryOp::Min) }
    pub fn pow(&self, rhs: &Tensor) -> Result<Tensor> { self.binary(rhs, BinaryOp::Pow) }
}


#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn binary_broadcasts_over_transposed_views() {
        let a = Tensor::from_vec((0..6).map(|x| x as f32).collect(), &[2, 3], Device::Cpu).unwrap().t().unwrap(); // [3,2]
        let b = Tensor::from_vec(vec![10f32, 20.0], &[2], Device::Cpu).unwrap();
        let c = a.add(&b).unwrap();
        assert_eq!(c.shape(), &[3, 2]);
        assert_eq!(c.to_vec::<f32>().unwrap(), vec![10.0, 23.0, 11.0, 24.0, 12.0, 25.0]);
        let h = a.to_dtype(DType::BF16).unwrap().mul(&b.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(h.to_vec_f32().unwrap(), vec![0.0, 60.0, 10.0, 80.0, 20.0, 100.0]);
        assert!(a.add(&Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap()).is_err());
    }
}

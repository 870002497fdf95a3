//! An 8-bit RGB picture in memory (row-major [H, W, 3]) and its PNG/JPEG files (through the
//! `image` crate, PNG and JPEG decoders only). The face detector takes this type.

use std::path::Path;

use engine::{DType, Device, Error, Result, Tensor};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// [height, width, 3], row-major.
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        if data.len() != width * height * 3 {
            return Err(Error::msg(format!("RgbImage: {width}x{height} needs {} bytes, got {}", width * height * 3, data.len())));
        }
        Ok(RgbImage { width, height, data })
    }

    /// Reads a PNG or JPEG file (any colour type: grey, alpha and 16-bit are converted to RGB8).
    pub fn open(path: impl AsRef<Path>) -> Result<RgbImage> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let img = image::ImageReader::open(path)
            .map_err(|e| Error::Io { path: shown.clone(), source: e })?
            .with_guessed_format()
            .map_err(|e| Error::Io { path: shown.clone(), source: e })?
            .decode()
            .map_err(|e| Error::File { path: shown, msg: format!("cannot decode the image: {e}") })?
            .into_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        RgbImage::new(w, h, img.into_raw())
    }

    /// Writes a PNG.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        image::save_buffer_with_format(path, &self.data, self.width as u32, self.height as u32, image::ExtendedColorType::Rgb8, image::ImageFormat::Png)
            .map_err(|e| Error::File { path: path.display().to_string(), msg: format!("cannot write the PNG: {e}") })
    }

    /// [1, 3, H, W] f32 with values 0..=255.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let plane = self.width * self.height;
        let mut v = vec![0f32; 3 * plane];
        for (i, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                v[c * plane + i] = px[c] as f32;
            }
        }
        Tensor::from_f32_vec(v, &[1, 3, self.height, self.width], DType::F32)?.to_device(Device::Cpu)
    }
}

//! The networks of LCM-Lookahead written against the engine and autograd: SDXL (UNet, CLIP text
//! encoders, VAE), TAESD, LoRA, the IP-Adapter face encoder, the KV-encoder UNet, IR-SE50 ArcFace,
//! MTCNN, schedulers and pipelines, with their weight loaders and presets. No training loop here.
//! (Arrives with the SDXL-family and face-side issues.)

pub mod align;
pub mod arcface;
pub mod attention;
pub mod clip_text;
pub mod clip_vision;
pub mod conditioning;
pub mod family;
pub mod hub;
pub mod ip_adapter;
pub mod kv_encoder;
pub mod mtcnn;
pub mod nn;
pub mod nn_face;
pub mod presets;
pub mod resampler;
pub mod rgb_image;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod weights;

//! Model configurations by name: `sdxl` (the real SDXL base UNet) and `tiny` (the same topology —
//! three blocks, the first without attention, text_time embedding, linear projections — at small
//! widths and depths; a forward pass takes well under a second on a CPU). The tiny UNet is the
//! configuration of the committed test fixture tests/fixtures/sdxl_tiny_unet/.

use crate::unet::UNetConfig;

/// stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
pub fn sdxl_unet() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        block_out_channels: vec![320, 640, 1280],
        down_attention: vec![false, true, true],
        up_attention: vec![true, true, false],
        layers_per_block: 2,
        transformer_layers_per_block: vec![1, 2, 10],
        reverse_transformer_layers_per_block: vec![10, 2, 1],
        num_attention_heads: vec![5, 10, 20],
        cross_attention_dim: 2048,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        text_time: Some((256, 2816)),
    }
}

/// The tiny UNet: widths 16/32/32, 8 norm groups, 2 heads, transformer depths [1, 1, 2], cross
/// dim 32, pooled text dim 32 (6·8 + 32 = 80 add-embedding inputs).
pub fn tiny_unet() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        block_out_channels: vec![16, 32, 32],
        down_attention: vec![false, true, true],
        up_attention: vec![true, true, false],
        layers_per_block: 2,
        transformer_layers_per_block: vec![1, 1, 2],
        reverse_transformer_layers_per_block: vec![2, 1, 1],
        num_attention_heads: vec![2, 2, 2],
        cross_attention_dim: 32,
        norm_num_groups: 8,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        text_time: Some((8, 80)),
    }
}

/// A UNet configuration by preset name.
pub fn unet_preset(name: &str) -> Option<UNetConfig> {
    match name {
        "sdxl" => Some(sdxl_unet()),
        "tiny" => Some(tiny_unet()),
        _ => None,
    }
}

//! The lookahead trainer: diffusion and lookahead identity losses, data sets, checkpoints and
//! data-parallel training. It composes models; it defines no layers or kernels. (Arrives with the
//! training issue.)

# Mixed precision on GPUs (float16 with a dynamic loss scale); on a machine without a GPU training
# stays in float32 with a warning, since mmcv's CPU kernels are float32-only.
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')

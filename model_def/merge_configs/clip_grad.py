# Clip the gradient norm (mmdet's default for RetinaNet-style heads and many fine-tunes).
optim_wrapper = dict(clip_grad=dict(max_norm=35, norm_type=2))

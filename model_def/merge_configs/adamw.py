# AdamW in place of the base config's SGD (mmdet's DETR-family defaults): merge_config: merge_configs/adamw.py
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))

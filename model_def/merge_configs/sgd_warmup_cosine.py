# SGD with a linear warm-up over 500 iterations, then cosine annealing to 1% of the rate over 12 epochs.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=12, T_max=12, eta_min_ratio=0.01,
         convert_to_iter_based=True),
]

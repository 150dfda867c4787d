# Multi-scale training: each training image is resized to a random short side in 480..800
# (long side at most 1333), as in mmdet's ms-3x schedules. Test-time size is unchanged.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomChoiceResize',
         scales=[(1333, 480), (1333, 544), (1333, 608), (1333, 672), (1333, 736), (1333, 800)],
         keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

# RTMDet-tiny as mmdet ships it (CSPNeXt, EMAHook, PipelineSwitchHook, SyncBN, dynamic validation
# intervals), shrunk for the drawn-shapes set on a CPU: 1/8 width, 128-px images, 6 epochs with the
# pipeline switch at epoch 4. Trains from scratch (no ImageNet backbone).
_base_ = 'mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py'

data_root = 'data/shapes/'
metainfo = dict(
    classes=('circle', 'square', 'triangle'),
    palette=[(220, 20, 60), (0, 128, 255), (40, 180, 40)])
image_size = (128, 128)
max_epochs = 6
switch_epoch = 4

model = dict(
    backbone=dict(widen_factor=0.125, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128], out_channels=32),
    bbox_head=dict(in_channels=32, feat_channels=32, num_classes=3))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='CachedMosaic', img_scale=image_size, pad_val=114.0, max_cached_images=20, random_pop=False),
    dict(type='RandomResize', scale=(256, 256), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=image_size),
    dict(type='YOLOXHSVRandomAug'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Pad', size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type='CachedMixUp', img_scale=image_size, ratio_range=(1.0, 1.0), max_cached_images=10,
         random_pop=False, pad_val=(114, 114, 114), prob=0.5),
    dict(type='PackDetInputs'),
]
train_pipeline_stage2 = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=image_size, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=image_size),
    dict(type='YOLOXHSVRandomAug'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Pad', size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='Pad', size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(
        data_root=data_root, metainfo=metainfo,
        ann_file='annotations/train.json', data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(
        data_root=data_root, metainfo=metainfo,
        ann_file='annotations/val.json', data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json', metric='bbox', proposal_nums=(100, 1, 10))
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=max_epochs, val_interval=3, dynamic_intervals=[(switch_epoch, 1)])
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0e-5, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', eta_min=0.0002, begin=max_epochs // 2, end=max_epochs,
         T_max=max_epochs // 2, by_epoch=True, convert_to_iter_based=True),
]
custom_hooks = [
    dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0002, update_buffers=True, priority=49),
    dict(type='PipelineSwitchHook', switch_epoch=switch_epoch, switch_pipeline=train_pipeline_stage2),
]
randomness = dict(seed=0)

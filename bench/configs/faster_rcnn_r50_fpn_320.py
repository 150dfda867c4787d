# Faster R-CNN R50-FPN with the model of mmdet's COCO 1x config, at 320 px on the drawn-shapes data,
# for bench/throughput.py --model r50-320. The backbone starts from random weights (a speed bench
# downloads nothing); every other model setting is restored to faster-rcnn_r50_fpn_1x_coco.py's.
_base_ = "../../model_def/configs/shapes_faster_rcnn.py"

image_size = (320, 320)

model = dict(
    backbone=dict(depth=50, base_channels=64, frozen_stages=1, norm_eval=True, init_cfg=None),
    neck=dict(in_channels=[256, 512, 1024, 2048], out_channels=256),
    rpn_head=dict(in_channels=256, feat_channels=256, anchor_generator=dict(scales=[8])),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=256), bbox_head=dict(in_channels=256, fc_out_channels=1024)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=2000, max_per_img=1000), rcnn=dict(sampler=dict(num=512))),
    test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000), rcnn=dict(max_per_img=100)),
)

train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=image_size, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="Resize", scale=image_size, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

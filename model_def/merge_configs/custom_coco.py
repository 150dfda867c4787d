# Your own COCO-format data set: point data_root at it, list the classes, and give every head the
# same number of classes. Paths are relative to data_root (which may be s3://... or gs://...).
data_root = 'data/my_dataset/'
classes = ('cat', 'dog')
metainfo = dict(classes=classes)
model = dict(roi_head=dict(bbox_head=dict(num_classes=2)))
train_dataloader = dict(dataset=dict(
    data_root=data_root, metainfo=metainfo,
    ann_file='annotations/train.json', data_prefix=dict(img='train/')))
val_dataloader = dict(dataset=dict(
    data_root=data_root, metainfo=metainfo,
    ann_file='annotations/val.json', data_prefix=dict(img='val/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

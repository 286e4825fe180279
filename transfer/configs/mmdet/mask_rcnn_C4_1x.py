# Mask R-CNN R50-C4, COCO 2017, 1x schedule: 90k iterations at 16 images per batch, LR steps at
# 60k and 80k, linear warm-up over 1000 iterations. IMSVD paper setting: base LR 0.1 (the stock
# 1x value is 0.02: --cfg-options optim_wrapper.optimizer.lr=0.02).
# Data: $DETECTRON2_DATASETS/coco (default ./datasets/coco), the layout the Detectron2 configs
# read: annotations/instances_{train,val}2017.json, train2017/, val2017/.
# Weights: imsvd-mmdet-train mask_rcnn_C4_1x.py --weights converted.pth
_base_ = "./base_rcnn_C4_syncbn.py"

dataset_type = "CocoDataset"
data_root = "{{$DETECTRON2_DATASETS:datasets}}/coco/"
backend_args = None
# Decode and resize with Pillow, as Detectron2 does.
backend = "pillow"
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args, imdecode_backend=backend),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    # Short side drawn from 640..800 (step 32), long side at most 1333.
    dict(
        type="RandomChoiceResize",
        scales=[(1333, 640), (1333, 672), (1333, 704), (1333, 736), (1333, 768), (1333, 800)],
        keep_ratio=True,
        backend=backend,
    ),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args, imdecode_backend=backend),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True, backend=backend),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    batch_sampler=dict(type="AspectRatioBatchSampler"),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file="annotations/instances_train2017.json",
        data_prefix=dict(img="train2017/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file="annotations/instances_val2017.json",
        data_prefix=dict(img="val2017/"),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(
    type="CocoMetric",
    ann_file=data_root + "annotations/instances_val2017.json",
    metric=["bbox", "segm"],
    format_only=False,
    backend_args=backend_args,
)
test_evaluator = val_evaluator

max_iters = 90000
# Evaluate once, after the last iteration (Detectron2: TEST.EVAL_PERIOD 0).
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=0.1))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(
        type="MultiStepLR",
        begin=0,
        end=max_iters,
        by_epoch=False,
        milestones=[60000, 80000],
        gamma=0.1,
    ),
]
work_dir = "output/mmdet/mask_rcnn_C4_1x"

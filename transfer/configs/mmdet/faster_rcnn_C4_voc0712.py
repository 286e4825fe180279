# Faster R-CNN R50-C4 on PASCAL VOC: train on VOC2007 trainval + VOC2012 trainval, test on
# VOC2007 test, 24k iterations at 16 images per batch (LR 0.02, steps 18k / 22k, 100 warm-up
# iterations), short side 480..800 -- the schedule of the Detectron2 config of the same name.
# Reported: mAP over IoU 0.50:0.95 (AP), AP50 and AP75 with the VOC2007 11-point metric.
# Data: $DETECTRON2_DATASETS/VOC2007 and VOC2012 (default ./datasets).
_base_ = "./base_rcnn_C4_syncbn.py"

model = dict(
    type="FasterRCNN",
    roi_head=dict(bbox_head=dict(num_classes=20), mask_roi_extractor=None, mask_head=None),
)

dataset_type = "VOCDataset"
data_root = "{{$DETECTRON2_DATASETS:datasets}}/"
backend_args = None
backend = "pillow"
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args, imdecode_backend=backend),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(
        type="RandomChoiceResize",
        scales=[(1333, s) for s in range(480, 801, 32)],
        keep_ratio=True,
        backend=backend,
    ),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args, imdecode_backend=backend),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True, backend=backend),
    dict(type="LoadAnnotations", with_bbox=True),
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
        type="ConcatDataset",
        # Each VOCDataset records its year in the metainfo; ConcatDataset must ignore it.
        ignore_keys=["dataset_type"],
        datasets=[
            dict(
                type=dataset_type,
                data_root=data_root,
                ann_file="VOC2007/ImageSets/Main/trainval.txt",
                data_prefix=dict(sub_data_root="VOC2007/"),
                filter_cfg=dict(filter_empty_gt=True, min_size=32, bbox_min_size=32),
                pipeline=train_pipeline,
                backend_args=backend_args,
            ),
            dict(
                type=dataset_type,
                data_root=data_root,
                ann_file="VOC2012/ImageSets/Main/trainval.txt",
                data_prefix=dict(sub_data_root="VOC2012/"),
                filter_cfg=dict(filter_empty_gt=True, min_size=32, bbox_min_size=32),
                pipeline=train_pipeline,
                backend_args=backend_args,
            ),
        ],
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
        ann_file="VOC2007/ImageSets/Main/test.txt",
        data_prefix=dict(sub_data_root="VOC2007/"),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(
    type="VOCMetric",
    metric="mAP",
    eval_mode="11points",
    iou_thrs=[0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95],
)
test_evaluator = val_evaluator

max_iters = 24000
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=0.02))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(
        type="MultiStepLR",
        begin=0,
        end=max_iters,
        by_epoch=False,
        milestones=[18000, 22000],
        gamma=0.1,
    ),
]
default_hooks = dict(checkpoint=dict(interval=6000))
work_dir = "output/mmdet/faster_rcnn_C4_voc0712"

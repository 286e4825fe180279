# A handful of iterations at a tiny input size: checks the whole path (weights -> train ->
# checkpoint -> COCO evaluation of boxes and masks) on CPU in about a minute. Not a benchmark.
# Tests point the data at a tiny COCO-layout set they write themselves (--cfg-options
# train_dataloader.dataset.data_root=... and the same for val/test and val_evaluator.ann_file).
_base_ = "./mask_rcnn_C4_1x.py"

# Few, small regions: the C4 head runs res5 on every region.
model = dict(
    roi_head=dict(
        bbox_roi_extractor=dict(roi_layer=dict(output_size=6)), bbox_head=dict(roi_feat_size=3)
    ),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=200, max_per_img=50),
        rcnn=dict(sampler=dict(num=8), mask_size=6),
    ),
    test_cfg=dict(
        rpn=dict(nms_pre=200, max_per_img=16),
        # Keep low-score detections so that the evaluator has something to score.
        rcnn=dict(score_thr=0.0, max_per_img=8),
    ),
)

backend = "pillow"
train_pipeline = [
    dict(type="LoadImageFromFile", imdecode_backend=backend),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="Resize", scale=(96, 64), keep_ratio=True, backend=backend),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", imdecode_backend=backend),
    dict(type="Resize", scale=(96, 64), keep_ratio=True, backend=backend),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        ann_file="annotations/instances_val2017.json",
        data_prefix=dict(img="val2017/"),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 4
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=0.005))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=2),
    dict(type="MultiStepLR", begin=0, end=max_iters, by_epoch=False, milestones=[3], gamma=0.1),
]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1000))
log_processor = dict(window_size=1)
work_dir = "output/mmdet/mask_rcnn_C4_instant_test"

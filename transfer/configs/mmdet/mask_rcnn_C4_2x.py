# Mask R-CNN R50-C4, COCO 2017, 2x schedule: 180k iterations, LR steps at 120k and 160k.
_base_ = "./mask_rcnn_C4_1x.py"

max_iters = 180000
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(
        type="MultiStepLR",
        begin=0,
        end=max_iters,
        by_epoch=False,
        milestones=[120000, 160000],
        gamma=0.1,
    ),
]
work_dir = "output/mmdet/mask_rcnn_C4_2x"

"""Detectron2: weight conversion, the ROI head extension, one's own COCO data, the trainer and
the fine-tuning entry point (``imsvd-d2-train``, ``transfer/train_net.py``)."""

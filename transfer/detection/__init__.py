"""Detection transfer: a backbone fine-tuned in Detectron2 (:mod:`transfer.detection.d2`) or
MMDetection (:mod:`transfer.detection.mmdet`), and what both share (the ResNet key rules, the
conversion report and command, the entry points' view of the optional stacks)."""

"""MMDetection: weight conversion, the shared-head extension, the runner over mmengine and the
fine-tuning entry point (``imsvd-mmdet-train``)."""

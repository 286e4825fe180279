#!/usr/bin/env bash
# One-shot GPU check of the CUDA paths: first benchmarks/gpu_check.py (training images/s of
# the trainer against a reference-structure loop, the kNN on a 1.28M x 2048 bank, the three
# methods on Fashion-MNIST; JSON + markdown in $OUT/gpu_check), then engine training steps under
# fp16 (GradScaler) and bf16 autocast, the IMSVD loss benchmark, training-step throughput, and
# Detectron2 Mask R-CNN C4 (convert -> instant train -> COCO eval) on CUDA. Prints everything;
# writes logs to $OUT. FASHION_MNIST_DIR: the idx .gz folder for gpu_check.py's third part.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/imsvd_gpu_check}
PY=${PYTHON:-python3}
FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== gpu_check.py (budget 540 s): train images/s, kNN 1.28M x 2048, three methods"
rm -f "$OUT/gpu_check/gpu_check.md"
timeout 600 $PY benchmarks/gpu_check.py --out "$OUT/gpu_check" \
  --data-dir "$FASHION_MNIST_DIR" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check.py exit $?"
cat "$OUT/gpu_check/gpu_check.md" 2>/dev/null || tail -20 "$OUT/gpu_check.log"
for p in fp16 bf16; do
  echo "== engine smoke on CUDA, $p"
  timeout 90 $PY -m pretrain.main --config configs/pretrain/imsvd_smoke.yaml train.device=cuda \
    train.precision=$p data.pipeline=fast train.channels_last=true \
    checkpoint.output_dir="$OUT/smoke_$p" 2>&1 | grep -E "step 4/4|finished|error|Error" | tail -3
done
echo "== loss benchmark (CUDA)"
timeout 100 $PY benchmarks/bench_loss.py --device cuda --repeats 3 --skip-dist 2>&1 | tail -12
echo "== train-step throughput (CUDA, ResNet-50, 224 px, batch 64 x 2 views)"
timeout 120 $PY benchmarks/bench_train_step.py --device cuda --arch resnet50 --stem standard \
  --size 224 --batch 64 --projector 8192-8160 --steps 5 --rounds 3 2>&1 | tail -6
echo "== Detectron2 Mask R-CNN C4 on CUDA (instant config)"
timeout 150 $PY - "$OUT" <<'PYEOF' 2>&1 | grep -vE "^\s*$|Warning|warn" | tail -12
import importlib.util, os, sys, time
from pathlib import Path
out = sys.argv[1]
sys.path.append("tests")  # helpers.py, which the test module imports (after the packages)
from helpers import export_and_convert
spec = importlib.util.spec_from_file_location("t_d2", "tests/transfer/detection/d2/test_detectron2.py")
t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
from detectron2.data.datasets import register_coco_instances
from transfer.detection.d2 import trainer as d2_trainer
print(export_and_convert(Path(out), "convert_to_d2", "r50.pkl")[2])
ann = t._make_tiny_coco(f"{out}/coco")
register_coco_instances("gpu_tiny", {}, ann, f"{out}/coco/images")
t0 = time.perf_counter()
res = d2_trainer.main(t._instant_args(f"{out}/r50.pkl", f"{out}/d2", "gpu_tiny", "MODEL.DEVICE", "cuda"))
print("d2 cuda instant train+eval: %.1f s" % (time.perf_counter() - t0))
r = res.get("gpu_tiny", res)
print("bbox AP %.2f segm AP %.2f" % (r["bbox"]["AP"], r["segm"]["AP"]))
PYEOF
echo "== done"

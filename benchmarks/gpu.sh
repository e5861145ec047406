#!/usr/bin/env bash
# What a machine with a CUDA GPU checks and measures, in one go (this project's CI has no GPU):
#   the CUDA tests (tests/test_cuda.py), a training step of PFENet + SVF and BAM + SVF at the recipe's
#   sizes (float32 / AMP bf16 / AMP fp16, both SVF forms), PFENet + SVF and baseline + SVF on VGG-16 beside
#   ResNet-50 at 473 and 641 px (the paper's PASCAL and COCO crops), the data path's scale benchmark on the
#   machine's cores (benchmarks/data_scale.py: prepare, the uint8 loader, validation's data), unmerged
#   against merged inference, the service under load at the recipe's sizes (torch backend, 500x500 JPEG uploads) where its
#   packages exist, and a query's latency at 473 px in PyTorch and ONNX Runtime CUDA (benchmarks/cpu_latency.py).
# usage: benchmarks/gpu.sh [log folder (default gpu_logs)] [size (473)] [batch (8)]
set -uo pipefail
out=${1:-gpu_logs}; size=${2:-473}; batch=${3:-8}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
if ! $py -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "benchmarks/gpu.sh: no CUDA device visible to $py (torch.cuda.is_available() is false); run it on a GPU machine" >&2
  exit 2
fi
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())"
} 2>&1 | tee "$out/gpu.txt"
$py -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" || status=1
for shots in 1 5; do
  for head in pfenet bam; do
    $py benchmarks/train_step.py --head $head --size "$size" --batch "$batch" --shots $shots --iters 10 2>&1 \
      | grep -v "randomly initialised" | tee "$out/train_step_${head}_${shots}shot.txt" || status=1
  done
done
for arch in resnet50_deep vgg16_bn; do
  for head in pfenet baseline; do
    for px in 473 641; do
      $py benchmarks/train_step.py --head $head --arch $arch --size $px --batch "$batch" --iters 10 2>&1 \
        | grep -v "randomly initialised" | tee "$out/train_step_${head}_${arch}_${px}.txt" || status=1
    done
  done
done
$py benchmarks/data_scale.py --benchmark coco --images 3000 --episodes 200 --real-json 2>&1 \
  | grep -v "it/s\|img/s\|file/s\|B/s" | tee "$out/data_scale_coco.txt" || status=1
$py benchmarks/svf_forms.py --arch resnet50_deep --size "$size" --batch "$batch" --iters 10 --device cuda 2>&1 \
  | grep -v "randomly initialised" | tee "$out/svf_forms.txt" || status=1
if $py -c "import fastapi, uvicorn, httptools, python_multipart, psutil" 2>/dev/null; then
  $py benchmarks/serve_load.py --random-model resnet50_deep:"$size" --backend torch --jpeg --image-size 500 \
    --max-batch "$batch" --seconds 10 2>&1 | grep -v "randomly initialised" | tee "$out/serve_load.txt" || status=1
else
  echo "serve_load skipped: the service's packages (fastapi, uvicorn, httptools, python-multipart, psutil) are not importable" \
    | tee "$out/serve_load.txt"
fi
# issue "a real-size model at labelling speed": the CPU latency table's GPU counterpart (PyTorch, ONNX Runtime CUDA)
$py benchmarks/cpu_latency.py --device cuda --backends torch onnxruntime --threads 4 --batches 1 8 --runs 5 2>&1 \
  | tee "$out/gpu_latency.txt" || status=1
exit $status

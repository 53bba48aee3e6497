#!/bin/sh
# The study rerun with segtune on the synthetic set (docs/study/README.md): the four task sweeps
# as committed, scaled by --set to what 2 CPU cores train in about 40 minutes, then each task's
# report with its numbers as CSV. Run from the repository root after `make install`:
#   sh docs/study/run.sh            (or one task: sh docs/study/run.sh task2)
set -eu
PY=${PY:-.venv/bin/python}
export NO_ALBUMENTATIONS_UPDATE=1
URI=${URI:-sqlite:///mlflow.db}
# the quickstart's synthetic set (48 training and 16 validation images of 128x96 at zoom 2), its
# 96-pixel crops and batch 4, 20 epochs (the quickstart: 12); no ImageNet weights; DeepLab at
# output stride 8 (a 12x12 map); UNet 16->128 channels; one core per trial, two trials at a
# time; latency at the study's 1000x750 on one thread
SCALE="--set data.root=data/synthetic-quickstart-z2
 --set data.synthetic.train=48 --set data.synthetic.test=16 --set data.synthetic.size=128x96
 --set data.synthetic.zoom=2 --set data.synthetic.seed=0
 --set train.pretrained=none --set train.image_size=96 --set train.batch_size=4
 --set train.epochs=20 --set train.output_stride=8
 --set train.unet_min_channels=16 --set train.unet_max_channels=128
 --set tune.repeats=3 --set tune.resources_per_trial.cpu=1 --set tune.resources_per_trial.gpu=0
 --set tune.max_concurrent_trials=2
 --set bench.input=1000x750 --set bench.threads=1 --set bench.repeats=3 --set bench.warmup=1"
# ASPP's rates scaled to the 12x12 map as the study's 12/24/36 are to a 64x64 one (512 crops, OS 8)
RATES="--set train.aspp_rates=[2,4,6]"

task1() { $PY -m segtune.run sweeps/task1.yaml $SCALE --tracking-uri "$URI" --no-report; }
task2() { $PY -m segtune.run sweeps/task2.yaml $SCALE $RATES --tracking-uri "$URI" --no-report; }
task3() { $PY -m segtune.run sweeps/task3.yaml $SCALE $RATES --tracking-uri "$URI" --no-report; }
# Task 4 on ResNet18, the DeepLab backbone that learns here (MobileNetV3-small from scratch does
# not generalise from 48 images: README, "What the quickstart shows")
task4() {
  $PY -m segtune.run sweeps/task4.yaml $SCALE $RATES --set train.backbone=resnet18 \
    --tracking-uri "$URI" --no-report
}
report() {
  $PY -m dashboards.report --experiment "$1" --tracking-uri "$URI" --out "reports/study/$1" \
    --csv "docs/study/$1"
}

for task in ${@:-task1 task2 task3 task4}; do
  "$task"
  report "$task"
done

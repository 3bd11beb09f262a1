#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, as one script (under 8 minutes on
# one H100/H200): the step matrix {RRDBNet-23, MSRResNet-16} x {psnr, gan} x {eager, compiled} and SRCNN,
# each row with the BasicSR-style fp32 eager baseline measured in the same process, the loader
# (png/npy/npy.lz4 on one core; npy and png shards at esrgan_psnr_x4's process count, finished on
# the GPU), then a 300-step raysr.train run with the real loader (its data_wait_frac and crops/s),
# and raysr.upscale in one process beside Ray Data (MP/s per GPU; its row is limited to 90 s).
#
#   bash bench/gpu_matrix.sh                # on a GPU machine, from the repository root
#   bash bench/gpu_matrix.sh --smoke        # the same script end to end on CPU with tiny networks
#
# Results: $RESULTS_DIR (default bench/results; a temporary folder with --smoke)/<date>-<gpu>.json, one object with the device,
# torch, commit and every row (each row names its own command), plus <date>-<gpu>.log.
# Needs raysr's dependencies importable (PYTHONPATH=. is set here, so no install is needed);
# without Ray the raysr.train row is recorded as skipped (the step rows do not need Ray).
# The lent GPU machines have CUDA torch but no Ray and no registry: build .whl/ here first with
# `python bench/carry_wheels.py` (a trimmed Ray of the tested version plus what else the image lacks,
# 46 MiB), then call the device tool's run with carry [".whl"], timeout_s 600 and the command
# `RESULTS_DIR=$OUT bash bench/gpu_matrix.sh` (what is under $OUT comes back: commit it to bench/results).
# When .whl/ holds wheels this script installs them into a fresh folder first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAYSR_OFFLINE=1

smoke=0
[[ "${1:-}" == "--smoke" ]] && smoke=1
python=${PYTHON:-python3}
results_dir=${RESULTS_DIR:-bench/results}
(( smoke )) && results_dir=${RESULTS_DIR:-$(mktemp -d)}  # a smoke run's figures are not results
mkdir -p "$results_dir"
rows=$(mktemp)
site=$(mktemp -d)
trap 'rm -rf "$rows" "$site"' EXIT
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (bench/carry_wheels.py): they come first
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl ||
        { echo "gpu_matrix.sh: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$site:$PYTHONPATH"
fi

if (( smoke )); then
    # Tiny networks on the CPU: every command of the matrix runs, in about three minutes.
    gpu=cpu-smoke
    sizes=(--device cpu --batch-size 2 --gt-size 64 --steps 4 --warmup 1 --interval 2
           --set model.generator.num_block=1 --set model.generator.num_feat=16 --set model.discriminator.num_feat=16)
    train_args=(--preset quickstart --set train.total_steps=20 --set run.log_every=10 --set run.val_every=20
                --set run.checkpoint_every=20 --set data.num_workers=1)
    step_timeout=300
    data_args=(--device cpu --batches 10) rounds=1
    upscale_args=(--device cpu --images 4 --size 32) upscale_limit=180
else
    gpu=$($python -c "import torch; print(torch.cuda.get_device_name(0).replace('NVIDIA ', '').replace(' ', '-'))") || {
        echo "gpu_matrix.sh: torch sees no CUDA GPU; use --smoke on a CPU machine" >&2; exit 2; }
    sizes=(--device cuda --batch-size 16 --gt-size 128 --steps 60 --warmup 10 --interval 10)
    # ESRGAN's PSNR phase on the demo shards; the loader settings are the GPU preset's own.
    train_args=(--preset esrgan_psnr_x4 --set train.total_steps=300 --set run.log_every=50 --set run.val_every=300
                --set run.checkpoint_every=300 --set run.use_gpu=true)
    step_timeout=150  # one row that compiles for longer is recorded as timed out, the rest still run
    data_args=(--device cuda --batches 100) rounds=3
    upscale_args=(--device cuda --images 32 --size 256) upscale_limit=90
fi
stamp=$(date -u +%Y-%m-%d)
log="$results_dir/$stamp-$gpu.log"
: >"$log"
echo "gpu_matrix.sh: $gpu, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), log $log"
$python -c "import ray; print('gpu_matrix.sh: ray', ray.__version__, 'from', ray.__file__)" 2>/dev/null | tee -a "$log"

row() {  # row NAME TIMEOUT COMMAND...: run a bench, keep its JSON line (or a failure row)
    local name=$1 limit=$2 start=$SECONDS out
    shift 2
    echo "== $name: $*" | tee -a "$log"
    out=$(timeout "$limit" "$@" 2>>"$log" | tee -a "$log" | tail -n 1)
    local rc=${PIPESTATUS[0]}
    if (( rc == 0 )) && [[ "$out" == "{"* ]]; then
        echo "{\"row\": \"$name\", ${out#\{}" >>"$rows"
    else
        printf '{"row": "%s", "command": "%s", "error": "exit %s after %s s (see the log)"}\n' \
            "$name" "$*" "$rc" "$((SECONDS - start))" >>"$rows"
    fi
    echo "   $((SECONDS - start)) s" | tee -a "$log"
}

for model in rrdbnet msrresnet; do
    for phase in psnr gan; do
        row "$model-$phase-eager" "$step_timeout" $python -m raysr.bench step --model "$model" --phase "$phase" \
            --compile off --baseline --json "${sizes[@]}"
        row "$model-$phase-compiled" "$step_timeout" $python -m raysr.bench step --model "$model" --phase "$phase" \
            --compile default --baseline --json "${sizes[@]}"
    done
done
# SRCNN at its preset's crop and batch: its measured crops/s is what sizes its loader (docs/performance.md's
# table has only the 40 %-MFU bound, which its memory-bound convolutions never reach)
row "srcnn-psnr-eager" "$step_timeout" $python -m raysr.bench step --model srcnn --phase psnr --compile off --json \
    "${sizes[@]}" --batch-size 64 --gt-size 64
# run.deterministic's cost: the eager GAN step of rrdbnet with deterministic kernels only (docs/fault-tolerance.md)
row "rrdbnet-gan-deterministic" "$step_timeout" $python -m raysr.bench step --model rrdbnet --phase gan \
    --compile off --json --set run.deterministic=true "${sizes[@]}"

# The loader: formats side by side on one core, then the PSNR preset's processes on npy and png shards of
# the same photos (scikit-image's), batches finished on the device as a training rank does.
row "data-formats" 300 $python -m raysr.bench data --preset esrgan_psnr_x4 --rounds "$rounds" --json "${data_args[@]}"
data_root=$(mktemp -d)
photos=$($python -c "from raysr.demo import TRAIN_PHOTOS, sample_photo_dir; print(' '.join(str(sample_photo_dir() / n) for n in TRAIN_PHOTOS))")
workers=$($python -c "from raysr.config import load_config; print(load_config(preset='esrgan_psnr_x4').data.num_workers)")
for fmt in npy png; do
    # shellcheck disable=SC2086  # the photo paths are one word each
    $python -m raysr.data.make_shards --input $photos --output "$data_root/$fmt" --format "$fmt" >>"$log" 2>&1
    row "data-$fmt-x$workers" 300 $python -m raysr.bench data --shards "$data_root/$fmt" --preset esrgan_psnr_x4 \
        --workers "$workers" --json "${data_args[@]}"
done
rm -rf "$data_root"

# A real run: loader processes, LR on the GPU, validation and a checkpoint at the end.
if $python -c "import ray.train.torch, ray.dashboard.optional_deps" 2>>"$log"; then  # raysr starts the dashboard
    run_root=$(mktemp -d)
    row "train-300" 240 $python -m raysr.bench train --storage "$run_root" --json -- "${train_args[@]}"
    rm -rf "$run_root"
else
    printf '{"row": "train-300", "skipped": "ray[train,default] is not importable here (see the log): carry it with bench/carry_wheels.py"}\n' >>"$rows"
fi

# raysr.upscale on the same images in one process and on Ray Data (an actor per GPU): MP/s, overhead_frac
if $python -c "import ray" 2>/dev/null; then
    row "upscale" "$upscale_limit" $python -m raysr.bench upscale --json "${upscale_args[@]}"
else
    printf '{"row": "upscale", "skipped": "ray is not importable here: carry its wheel to measure the Ray Data path"}\n' >>"$rows"
fi

$python - "$rows" "$results_dir/$stamp-$gpu.json" <<'EOF'
import json, subprocess, sys
import torch
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
json.dump({"device": device, "torch": torch.__version__, "commit": head, "script": "bench/gpu_matrix.sh",
           "rows": rows}, open(sys.argv[2], "w"), indent=1)
print(f"gpu_matrix.sh: {len(rows)} rows -> {sys.argv[2]}")
for r in rows:
    keys = ("crops_per_s", "mfu", "speedup_vs_baseline", "peak_mem_gb", "data_wait_frac", "overhead_frac",
            "mp_per_s_per_gpu")
    print(" ", r["row"],
          {k: round(r[k], 3) for k in keys if isinstance(r.get(k), (int, float))}, r.get("error") or r.get("skipped") or "")
EOF

"""What the pretraining health monitor costs the demo: one monitor call against one training step, measured
side by side in one run, and the share of the demo's pretraining time that params.yaml's monitor schedule
(``pretrain.monitor``: every N steps and at each epoch end) adds.

The step is ``bench_pretrain_step.py``'s demo setting in the default variant (bf16, attention written out on
the CPU); the monitor embeds params.yaml's ``pretrain.monitor.bank`` training and ``queries`` validation
images of the demo's shards (run ``dvc repro prepare`` or ``make repro`` first) with the same encoder.

    python benchmarks/bench_monitor.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import fmt, measure
from bench_pretrain_step import SETTINGS, VARIANTS, bench

from ijepa.data import read_manifest
from ijepa.device import pick_device
from ijepa.pretrain import build_jepa
from pipeline.monitoring import build_health_monitor
from pipeline.params import load_params, section
from stages.pretrain import SHARDS

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    device = pick_device("auto")
    params = load_params(ROOT / "params.yaml")
    data, optim, pre = section(params, "data"), section(params, "optim"), section(params, "pretrain")
    mon = pre.monitor
    if not (ROOT / SHARDS / "manifest.json").is_file():
        sys.exit(f"bench_monitor: {ROOT / SHARDS} holds no shards: run `dvc repro prepare` first")
    manifest = read_manifest(ROOT / SHARDS)
    setting = SETTINGS["demo"]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    step = bench(setting, device, VARIANTS["bf16 (default)"], args.repeats)
    print(fmt(f"training step ({setting['label']})", step))
    health = build_health_monitor(ROOT / SHARDS, manifest, mon, data.crop_size, device, optim.bf16)
    # the demo's target encoder, freshly initialised (a trained one costs the same)
    encoder = build_jepa(setting["spec"], seed=0).target_encoder.to(device)
    call = measure(lambda: health(encoder), warmup=1, repeats=max(3, args.repeats // 3))
    print(fmt(f"monitor call ({len(health.bank)} bank + {len(health.queries)} queries)", call))
    ipe = manifest["splits"]["train"]["count"] // pre.batch_size
    steps = pre.epochs * ipe
    calls = 1 + len({s for s in range(1, steps + 1) if s % ipe == 0 or (mon.every and s % mon.every == 0)})
    train_s, monitor_s = steps * step["median"] / 1000, calls * call["median"] / 1000
    print(
        f"demo schedule: {steps} steps, {calls} monitor calls (every={mon.every}, plus epoch ends and step 0): "
        f"{train_s:.0f} s training + {monitor_s:.1f} s monitoring = {100 * monitor_s / train_s:.1f}% added "
        f"(one call = {call['median'] / step['median']:.1f} steps)"
    )


if __name__ == "__main__":
    main()

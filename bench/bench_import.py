"""Import time and peak memory of a 1024-px paper-config NVIDIA pickle (run by hand, not by CI).

    python bench/bench_import.py --ada /tmp/nv-ada [--repeats 3] [--resolution 1024]

1. Builds, with NVIDIA's own code (a checkout of NVlabs/stylegan2-ada-pytorch, never committed), a random
   snapshot in the layout train.py writes: G, D, G_ema of config F at 1024 px (z = w = 512, 8 mapping
   layers, channel_base 32768, channel_max 512, num_fp16_res 4, conv_clamp 256), pickled to a temp file.
2. Times, each in a fresh process (so peak memory is that process's alone; imports and sdsg's first-call
   warm-up on a tiny fixture are excluded), alternating, --repeats times:
   * baseline: NVIDIA's loader, ``pickle.load`` with NVIDIA's code on the path (it ``exec``s the embedded
     module source and builds NVIDIA's networks);
   * sdsg convert: ``sdsg_ray.nvidia_pickle.convert`` on the file's bytes (restricted unpickler, name map,
     this project's networks): what NVIDIA's load does, without its exec;
   * sdsg import: ``sdsg_ray.export.import_model``, the whole command (the convert, then writing
     inference.pt + discriminator.pt).
   Wall seconds of the load (imports excluded) and the process's peak RSS above its RSS before the load.
Prints medians and the ratios over the baseline as JSON. The machine is shared: read medians, not single runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = r"""
import pickle, sys, torch
sys.path.insert(0, {ada!r})
import dnnlib
common = dict(c_dim=0, img_resolution={res}, img_channels=3)
G = dnnlib.util.construct_class_by_name(class_name='training.networks.Generator', z_dim=512, w_dim=512,
    mapping_kwargs=dnnlib.EasyDict(num_layers=8), synthesis_kwargs=dnnlib.EasyDict(channel_base=32768,
    channel_max=512, num_fp16_res=4, conv_clamp=256), **common).eval().requires_grad_(False)
D = dnnlib.util.construct_class_by_name(class_name='training.networks.Discriminator', channel_base=32768,
    channel_max=512, num_fp16_res=4, conv_clamp=256, block_kwargs=dnnlib.EasyDict(),
    mapping_kwargs=dnnlib.EasyDict(), epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=4), **common).eval().requires_grad_(False)
import copy
G_ema = copy.deepcopy(G)
with open({path!r}, 'wb') as f:
    pickle.dump(dict(G=G, D=D, G_ema=G_ema, augment_pipe=None, training_set_kwargs=dict(resolution={res})), f)
"""

# Each measurement: imports first, then RSS before, the load, RSS peak after (ru_maxrss is in KiB on Linux).
MEASURE = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
{setup}
def rss_kib():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:'))
before = rss_kib()
start = time.perf_counter()
{load}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(seconds=seconds, peak_mib=(peak - before) / 1024)))
"""

NVIDIA_SETUP = "import pickle, torch\nsys.path.insert(0, {ada!r})\nimport dnnlib, torch_utils.persistence, training.networks"
NVIDIA_LOAD = "with open({path!r}, 'rb') as f:\n    nets = pickle.load(f)\nassert nets['G_ema'].img_resolution > 0"
# warm-up on the smallest committed fixture: torch's weights_only loader imports more modules on first use
SDSG_SETUP = ("import torch\nfrom sdsg_ray.export import import_model\nfrom sdsg_ray.nvidia_pickle import convert\n"
              f"convert(open({str(ROOT / 'tests/fixtures/nvidia/sg3_tiny32.pkl')!r}, 'rb').read(), 'warm-up')")
SDSG_LOAD = "result = import_model({path!r}, {out!r})\nassert result['model']['resolution'] > 0"
CONVERT_LOAD = "with open({path!r}, 'rb') as f:\n    nets = convert(f.read(), {path!r})\nassert nets.G_ema.resolution > 0"


def run_python(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ada", required=True, help="checkout of NVlabs/stylegan2-ada-pytorch")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-import-"))
    path = str(work / f"paper{args.resolution}.pkl")
    subprocess.run([sys.executable, "-c", BUILD.format(ada=args.ada, res=args.resolution, path=path)], check=True)
    size_mb = Path(path).stat().st_size / 1e6
    runs: dict[str, list[dict]] = {"nvidia": [], "sdsg_convert": [], "sdsg_import": []}
    for i in range(args.repeats):  # alternate, so load drifts on the shared machine hit both alike
        runs["nvidia"].append(run_python(MEASURE.format(
            root=str(ROOT), setup=NVIDIA_SETUP.format(ada=args.ada), load=NVIDIA_LOAD.format(path=path))))
        runs["sdsg_convert"].append(run_python(MEASURE.format(
            root=str(ROOT), setup=SDSG_SETUP, load=CONVERT_LOAD.format(path=path))))
        runs["sdsg_import"].append(run_python(MEASURE.format(
            root=str(ROOT), setup=SDSG_SETUP, load=SDSG_LOAD.format(path=path, out=str(work / f"out{i}")))))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_mib")} for k, v in runs.items()}
    print(json.dumps({
        "pickle": {"resolution": args.resolution, "megabytes": round(size_mb, 1)},
        "repeats": args.repeats, "median": med, "runs": runs,
        "ratio_over_nvidia": {k: {m: med[k][m] / med["nvidia"][m] for m in ("seconds", "peak_mib")}
                              for k in ("sdsg_convert", "sdsg_import")},
        "inference_pt_megabytes": round((work / "out0" / "inference.pt").stat().st_size / 1e6, 1),
    }, indent=1))


if __name__ == "__main__":
    main()

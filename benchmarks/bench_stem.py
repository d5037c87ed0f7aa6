"""The SCNet stem on the CPU: the max pool (ATen's NCHW and channels_last kernels against this
package's NCHW kernel, scnet_fused.ops.maxpool) and the fused scnet50 with its stem as built (bn1 +
ReLU fused, the pool on the kernel), with the stem's modules and the kernel pool, and with the
reference's stem (modules, nn.MaxPool2d), in one process.

    python benchmarks/bench_stem.py                      # pool rows + scnet50 train step / eval forward
    python benchmarks/bench_stem.py --no-model --rounds 9

Pool rows: the stem's 3x3 / stride 2 / padding 1 pool over N x 64 x 112 x 112 (ReLU'd input), forward
with the indices a backward needs, and without (inference); medians over interleaved rounds. Model
rows: the same fused scnet50 (224 px, the same parameter objects) with each stem, alternating: the stem
alone (training forward + backward), the training step and the eval forward.
Results: <out>/<name>.json and .md.
"""

import sys

import torch
import torch.nn.functional as F

from _ab import interleaved, parse_args, scnet50_jobs, write_rows
from scnet_fused import bench
from scnet_fused.modules import MaxPool2d
from scnet_fused.ops import maxpool


def _use(model, stem, pool):
    """The model's stem pool and stem function (None: the class's, the fused stem)."""
    model.maxpool = pool
    if stem is None:
        model.__dict__.pop("stem", None)
    else:
        model.stem = stem


def main(argv=None):
    args = parse_args(__doc__, "stem", argv)
    if not maxpool._kernel_ready():
        print("bench_stem: the package's max pool kernel is not available here (needs the AVX2 or AVX-512 "
              "build of the CPU kernels)", file=sys.stderr)
        return 2
    bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=True))
    N = args.batch_size
    x = torch.randn(N, 64, 112, 112).relu()
    xcl = x.contiguous(memory_format=torch.channels_last)
    op = torch.ops.scnet_fused._max_pool2d_nchw
    rows = []
    op_fns = {
        "aten NCHW, with indices": lambda: F.max_pool2d_with_indices(x, 3, 2, 1),
        "aten channels_last, with indices": lambda: F.max_pool2d_with_indices(xcl, 3, 2, 1),
        "scnet_fused NCHW, with indices": lambda: op(x, 3, 3, 2, 2, 1, 1, True),
        "aten NCHW, no indices": lambda: torch.ops.aten.max_pool2d(x, [3, 3], [2, 2], [1, 1]),
        "scnet_fused NCHW, no indices": lambda: op(x, 3, 3, 2, 2, 1, 1, False),
    }
    for k, ms in interleaved(op_fns, args.rounds, 5).items():
        rows.append(dict(what="pool", variant=k, shape=f"{N}x64x112x112", median_ms=ms))
    if not args.no_model:
        m, img, step, infer = scnet50_jobs(N)
        kernel_pool, aten_pool = MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1)

        def module_stem(x):
            return m.maxpool(m.relu(m.bn1(m.conv1(x))))

        stems = {  # (the stem function, the pool)
            "fused bn1 + ReLU, kernel pool (as built)": (None, kernel_pool),
            "modules, kernel pool": (module_stem, kernel_pool),
            "modules, nn.MaxPool2d (the reference's)": (module_stem, aten_pool),
        }

        def stem_alone():  # the stem's forward + backward in training (its parameters' gradients)
            y = m.stem(img)
            y.backward(torch.ones_like(y))

        m.train()
        for k, ms in interleaved({name: (lambda stem=stem, pool=pool: (_use(m, stem, pool), stem_alone()))
                                   for name, (stem, pool) in stems.items()}, 2 * args.rounds, 4).items():
            rows.append(dict(what="scnet50 stem, training forward + backward", variant=f"stem: {k}",
                             shape=f"{N}x3x224x224", median_ms=ms))
        m.zero_grad(set_to_none=True)

        for mode, fn, reps in (("train step", step, 2), ("eval forward", infer, 3)):
            m.train(mode == "train step")
            fns = {}
            for name, (stem, pool) in stems.items():
                def run(stem=stem, pool=pool, fn=fn):
                    _use(m, stem, pool)
                    fn()
                fns[name] = run
            for k, ms in interleaved(fns, args.rounds, reps).items():
                rows.append(dict(what=f"scnet50 {mode}", variant=f"stem: {k}", shape=f"{N}x3x224x224",
                                 median_ms=ms))
    write_rows(rows, args.out, args.name, f"The SCNet stem on the CPU, N={N}", "python benchmarks/bench_stem.py", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference on small inputs: the reference modules against the fused ones with and without the rule
that runs the reference computation on small maps (:data:`scnet_fused.modules.BOTTLENECK_INFERENCE_MIN_ELEMENTS`
and :data:`~scnet_fused.modules.SCCONV_INFERENCE_MIN_ELEMENTS`). Rows: the eval forward (no grad) of
scnet50 at a few small batches and image sizes, and, at 1x224, 2x128, 2x224 and 4x160, of each stage's first two
blocks on their inputs. Variants: the reference model; the fused model with the thresholds at 0 (the
fused paths at every size); the fused model as shipped. In one process, interleaved rounds.

    python benchmarks/bench_small_inference.py --threads 2 --rounds 7

Results: <out>/<name>.json and .md.
"""

import sys

import torch

from _ab import add_rows, parse_args, write_rows
from scnet_fused import bench, models, modules

SIZES = ((1, 160), (1, 224), (2, 128), (2, 224), (4, 160), (8, 224))
BLOCK_SIZES = ((1, 224), (2, 128), (2, 224), (4, 160))


def _variants(ref, fused, call):
    shipped = (modules.BOTTLENECK_INFERENCE_MIN_ELEMENTS, modules.SCCONV_INFERENCE_MIN_ELEMENTS)

    def with_thresholds(values, m):
        def run():
            previous = (modules.BOTTLENECK_INFERENCE_MIN_ELEMENTS, modules.SCCONV_INFERENCE_MIN_ELEMENTS)
            modules.BOTTLENECK_INFERENCE_MIN_ELEMENTS, modules.SCCONV_INFERENCE_MIN_ELEMENTS = values
            try:
                with torch.no_grad():
                    call(m)
            finally:
                modules.BOTTLENECK_INFERENCE_MIN_ELEMENTS, modules.SCCONV_INFERENCE_MIN_ELEMENTS = previous
        return run

    return {"reference": with_thresholds(shipped, ref), "fused, fused paths at every size": with_thresholds((0, 0), fused),
            "fused (small maps: the reference computation)": with_thresholds(shipped, fused)}


def main(argv=None):
    args = parse_args(__doc__, "small_inference", argv)
    bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=True))
    torch.manual_seed(0)
    ref = models.scnet50(fused=False).eval()
    fused = models.scnet50(fused=True).eval()
    fused.load_state_dict(ref.state_dict())
    rows = []
    if not args.no_model:
        for N, px in SIZES:
            x = torch.randn(N, 3, px, px)
            add_rows(rows, "scnet50 eval forward", f"{N}x3x{px}x{px}", _variants(ref, fused, lambda m: m(x)),
                     args.rounds, 1 if N * px * px > 200000 else 3)
    for N, px in BLOCK_SIZES:
        with torch.no_grad():
            h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(torch.randn(N, 3, px, px)))))
            for stage in range(1, 5):
                layer = f"layer{stage}"
                for j in range(2):
                    inp = h
                    add_rows(rows, f"{layer}[{j}] eval forward (scnet50 at {N}x3x{px}x{px})",
                             bench.shape_str(tuple(inp.shape)),
                             _variants(ref, fused, lambda m, layer=layer, j=j, inp=inp: getattr(m, layer)[j](inp)),
                             args.rounds, 5)
                    h = getattr(ref, layer)[j](h)
                for rest in getattr(ref, layer)[2:]:
                    h = rest(h)
    write_rows(rows, args.out, args.name, "SCNet-50 inference on small inputs: reference, fused, fused with the "
               "small-map rule", "python benchmarks/bench_small_inference.py", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Block-sparse layers (numbasparse) against dense PyTorch and its peers, on one machine in one run.

With --model: a pruned-model mode instead, an MLP hidden/4 -> hidden -> hidden -> hidden/4
pruned to block density d (largest-norm blocks kept), inference with numbasparse and with
onnxruntime and DeepSparse (--peer-python) where available, against the unpruned model in
dense PyTorch."""
import argparse
import json
import sys

from . import format_summary, format_table, run


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'numbasparse[plot]'", file=sys.stderr)
        return
    ours = [r for r in rows if r["impl"] == "numbasparse" and r["op"] in ("fwd", "train step")]
    batches = sorted({r["batch"] for r in ours})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, op in zip(axes, ("fwd", "train step")):
        for block in sorted({r["block"] for r in ours}):
            for batch in batches:
                pts = sorted((r["density"], r["speedup_vs_dense"]) for r in ours
                             if r["op"] == op and r["block"] == block and r["batch"] == batch)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"block {block}, batch {batch}")
        dens = sorted({r["density"] for r in ours})
        ax.plot(dens, [1 / d for d in dens], "k--", linewidth=0.8, label="ideal 1/density")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_xlabel("block density")
        ax.set_title(f"{op}: speedup vs dense torch")
    axes[0].set_ylabel("speedup (dense time / block-sparse time)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def _dense_gflops_one_thread(hidden):
    import torch

    from .timing import median_ms

    x, w = torch.randn(256, hidden), torch.randn(hidden, hidden)
    return 2.0 * 256 * hidden * hidden / (median_ms(lambda: x @ w, repeats=5) * 1e6)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m numbasparse.bench", description=__doc__,
                                epilog="Every implementation of an op is timed in interleaved rounds in this one "
                                       "process; the speedup column is dense torch's time over the row's time "
                                       "from the same rounds (with --model, DeepSparse runs in its own process: "
                                       "marked *, against dense torch of the same batch in this run).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run: the numba CPU kernels or the numba.cuda kernels (default: cpu)")
    p.add_argument("--hidden", type=int, default=4096,
                   help="features in and out of the benchmarked layer; with --model the MLP's hidden width, "
                        "its input and output being hidden/4 (default: 4096)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="rows of the input, one or more (default: 1 32 256; with --model: 1 64 256)")
    p.add_argument("--block", type=int, nargs="+", default=None, choices=(8, 16, 32),
                   help="block sizes, one or more (default: 8 16 32; with --model: 32)")
    p.add_argument("--density", type=float, nargs="+", default=None,
                   help="fractions of live blocks, one or more (default: 1.0 0.5 0.25 0.1 0.03; "
                        "with --model: 0.1 0.25)")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved timing rounds per measurement; the median is reported (default: 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for torch and the kernels (default: torch's current setting)")
    p.add_argument("--quick", action="store_true",
                   help="small grid in under a minute: batch 1 and 256, block 32 and 8, density 0.5 and 0.1, "
                        "conv block 32, the overhead and model rows; no peers.  With --model: batch 1 and 64, "
                        "density 0.1, 3 repeats")
    p.add_argument("--model", action="store_true",
                   help="run only the pruned-model mode: the MLP hidden/4 -> hidden -> hidden -> hidden/4 (ReLU "
                        "between, float32) pruned per layer to each --density of its largest-norm --block blocks, "
                        "inference (torch.inference_mode) with numbasparse, onnxruntime (if installed: the masked "
                        "dense model exported to ONNX) and DeepSparse (with --peer-python), against the unpruned "
                        "model in dense torch; the outputs are checked against the masked dense model first")
    p.add_argument("--peer-python", metavar="PATH",
                   help="with --model: the Python interpreter of another environment with deepsparse installed "
                        "(it needs numpy<2), e.g. a venv with deepsparse==1.8.0 \"numpy<2\" \"onnx<1.16\"; it "
                        "times the same ONNX file in its own process (numbasparse/bench/peer_worker.py)")
    p.add_argument("--no-conv", action="store_true", help="skip the convolution rows")
    p.add_argument("--no-peers", action="store_true",
                   help="time only numbasparse and dense torch (skip masked dense and torch BSR; with --model: "
                        "skip onnxruntime and DeepSparse)")
    p.add_argument("--no-precision", action="store_true",
                   help="skip the 16-bit rows (bfloat16 and float16 against float32: block 32, batch 1 and 256, "
                        "density 0.1)")
    p.add_argument("--no-lstm", action="store_true",
                   help="skip the LSTM rows (BlockSparseLSTM against torch.nn.LSTM: hidden 1024, batch 32, "
                        "64 steps, recurrent density 0.25, forward and forward+backward)")
    p.add_argument("--no-lsh", action="store_true",
                   help="skip the LSH output-layer rows (LSHOutputLayer against nn.Linear + softmax: vocabulary "
                        "32768, hidden 512, batch 128, 32 and 16 active blocks, train step without and with SGD / "
                        "Adam steps)")
    p.add_argument("--no-layers", action="store_true",
                   help="skip the per-call overhead rows (256x256 layer, batch 1) and the mixed-model rows")
    p.add_argument("--compile", action="store_true",
                   help="also report JIT compile times (fresh processes, cold and warm numba cache)")
    p.add_argument("--microkernel", action="store_true",
                   help="also time the CPU register tile alone (the kernels' ceiling on one core)")
    p.add_argument("--json", metavar="PATH", help="write rows and machine info as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help="save speedup-vs-density plots to PATH (needs matplotlib)")
    args = p.parse_args(argv)

    if args.model:
        if args.device != "cpu":
            p.error("--model runs on the CPU (numba CPU kernels, onnxruntime and DeepSparse on the CPU)")
        if args.plot:
            p.error("--plot draws the layer grid's speedup curves; --model has none")
        return _main_model(p, args)
    if args.peer_python:
        p.error("--peer-python goes with --model")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
    batches = args.batch or [1, 32, 256]
    blocks = args.block or [8, 16, 32]
    densities = args.density or [1.0, 0.5, 0.25, 0.1, 0.03]
    conv_blocks = (16, 32)
    model_densities = (0.25, 0.1)
    peers = not args.no_peers
    if args.quick:
        batches, blocks, densities, conv_blocks, model_densities = [1, 256], [32, 8], [0.5, 0.1], (32,), (0.1,)
        peers = False
    result = run(args.device, args.hidden, tuple(batches), tuple(blocks), tuple(densities), args.repeats,
                 args.threads, conv=not args.no_conv, peers=peers, conv_block_sizes=conv_blocks,
                 layers=not args.no_layers, model_densities=model_densities, precision=not args.no_precision,
                 lstm=not args.no_lstm, lsh=not args.no_lsh)
    info = result["info"]
    _print_header(info)
    print(format_table(result["rows"]))
    print()
    print(format_summary(result["rows"]))
    if "precision" in result:
        from .precision import format_precision

        print()
        print(format_precision(result["precision"]))
    if "lstm" in result:
        from .recurrent import format_lstm

        print()
        print(format_lstm(result["lstm"]))
    if "lsh" in result:
        from .lsh import format_lsh

        print()
        print(format_lsh(result["lsh"]))
    _extras(args, result)


def _print_header(info):
    print(f"# numbasparse bench: {info.get('gpu', info['cpu'])}, {info['threads']} threads, "
          f"torch {info['torch']}, numba {info['numba']}, {info['date']}, commit {info['commit']}")


def _main_model(p, args):
    from .pruned import format_pruned_table, run_pruned

    batches = args.batch or [1, 64, 256]
    blocks = args.block or [32]
    densities = args.density or [0.1, 0.25]
    repeats = args.repeats
    if args.quick:
        batches, densities, repeats = [1, 64], [0.1], min(repeats, 3)
    bad = [b for b in blocks if args.hidden % (4 * b)]
    if bad:
        p.error(f"--model: --hidden {args.hidden} must be a multiple of 4 x block ({4 * bad[0]}): "
                "the MLP's input and output have hidden/4 features")
    if any(not 0 < d <= 1 for d in densities):
        p.error("--model: each --density must be in (0, 1]")
    result = run_pruned(args.hidden, tuple(batches), tuple(blocks), tuple(densities), repeats, args.threads,
                        peers=not args.no_peers, peer_python=args.peer_python)
    _print_header(result["info"])
    print(format_pruned_table(result["rows"], result["notes"]))
    _extras(args, result)


def _extras(args, result):
    if args.compile:
        from .compile import compile_times, format_compile

        result["compile"] = compile_times()
        print()
        print(format_compile(result["compile"]))
    if args.microkernel:
        import torch

        from .microkernel import format_microkernel, microkernel_gflops

        torch.set_num_threads(1)
        dense_one_thread = _dense_gflops_one_thread(args.hidden)
        result["microkernel"] = {"gflops_by_block": microkernel_gflops(), "dense_torch_1_thread_gflops": dense_one_thread}
        print()
        print(format_microkernel(result["microkernel"]["gflops_by_block"]))
        print(f"dense torch, 1 thread, {args.hidden} x {args.hidden} @ batch 256: {dense_one_thread:.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        _plot(result["rows"], args.plot)


if __name__ == "__main__":
    main()

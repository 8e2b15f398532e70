"""Packing trials on one GPU: aggregate training throughput of 1, 2, 4 ... concurrent trial processes.

    python benchmarks/bench_packing.py [--arch fpn] [--encoder resnet101] [--size 512] [--batch 4]
        [--procs 1,2,4] [--seconds 20] [--amp]

What Ray's fractional GPUs (`--gpus-per-trial 0.5`) do is run several trial processes on one GPU.
This measures that directly, without Ray: K processes each run the project's training step
(model, loss, SGD + CyclicLR, `engine.forward`) on random data for a fixed time after warm-up;
the table gives images/s per process and in all, and the gain over one process.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def worker(args: argparse.Namespace, start: float, out: mp.Queue) -> None:
    import torch

    from trainables.config import LossConfig, ModelConfig, OptimConfig, RuntimeConfig
    from trainables.engine import build_loss, build_optimizer, forward
    from trainables.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    device = torch.device("cuda")
    runtime = RuntimeConfig(amp=args.amp, channels_last=args.amp)
    model = build_model(ModelConfig(arch=args.arch, encoder=args.encoder, encoder_weights=None), 4)
    model = model.to(device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(LossConfig()).to(device)
    optimizer, scheduler = build_optimizer(model, OptimConfig())
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 4, (args.batch, args.size, args.size), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(forward(model, x, runtime), y).backward()
        optimizer.step()
        scheduler.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    while time.time() < start:  # every process starts timing together
        time.sleep(0.01)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        steps += 5
    out.put(steps * args.batch / (time.perf_counter() - t0))


def measure(args: argparse.Namespace, procs: int) -> list[float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 30 + 5 * procs  # time for every process to build and warm up
    ps = [ctx.Process(target=worker, args=(args, start, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    rates = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fpn")
    p.add_argument("--encoder", default="resnet101")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last")
    args = p.parse_args()
    import torch

    print(
        f"# {args.arch} / {args.encoder}, {args.size} px, batch {args.batch}, "
        f"{'bf16+channels_last' if args.amp else 'fp32'}, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}"
    )
    print("| processes | images/s per process | images/s in all | gain over 1 |")
    print("| --- | --- | --- | --- |")
    base = None
    for n in (int(v) for v in args.procs.split(",")):
        rates = measure(args, n)
        total = sum(rates)
        base = base or total
        print(f"| {n} | {total / n:.1f} | {total:.1f} | {total / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
